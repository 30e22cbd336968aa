"""Files end to end on one platform of their own (its file URLs last seconds, so their
expiry is seen without a long wait): a typed handler takes a Path from a
multipart/form-data call, from a data: URI and from a URL the platform signed, and
returns a Path whose URL downloads its bytes without a key until it expires (then 403,
and the file is collected); a cog predictor takes and returns cog.Path through
/predictions and the real Replicate client (docs/function-api.md, "Files";
docs/cog.md)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import replicate
from replicate.helpers import FileOutput

from tests.conftest import FIXTURES, RunningPlatform
from tests.e2e.files_helpers import data_uri, download, short_lived_files, until
from tests.ops.test_cli import cli_env, thaw

# Long enough for a warm call and a download to happen well within it.
TTL_SECONDS = 20


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    with short_lived_files(tmp_path_factory, "thaw-files", TTL_SECONDS) as started:
        yield started


def test_a_typed_handler_takes_and_returns_files(platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "files_rt")
    assert resp.status_code == 201, resp.text
    schema = platform.http.get("/fn/dev/files-rt/openapi.json").json()
    body = schema["paths"]["/fn/dev/files-rt"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["properties"]["doc"] == {
        "type": "string", "format": "uri"}

    # multipart/form-data: the file part is the Path, the fields the other inputs.
    sent = b"hello \x00 bytes"
    form = platform.http.post("/fn/dev/files-rt", files={
        "doc": ("hello.txt", sent, "text/plain")}, data={"prefix": "P:", "times": "2"})
    assert form.status_code == 200, form.text
    answer = form.json()
    assert (answer["name"], answer["size"], answer["is_file"]) == ("hello.txt",
                                                                   len(sent), True)
    url = answer["file"]
    assert url.startswith(platform.platform.function_url + "/files/"), url
    got = download(url)
    assert got.status_code == 200, got.text
    assert got.content == b"P:" + sent * 2
    assert got.headers["Content-Type"].startswith("text/plain")
    assert got.headers["Content-Disposition"] == (
        "attachment; filename*=UTF-8''out-hello.txt")

    # A data: URI in JSON.
    inline = platform.invoke("files-rt", {"doc": data_uri(b"abc"), "times": 3})
    assert inline.status_code == 200, inline.text
    assert download(inline.json()["file"]).content == b"abcabcabc"

    # The signed URL of an earlier output, as an input: its bytes reach the handler.
    chained = platform.invoke("files-rt", {"doc": url})
    assert chained.status_code == 200, chained.text
    assert chained.json()["size"] == len(b"P:" + sent * 2)

    # Wrong inputs are the caller's, named: a field of the wrong type, a URL not
    # signed here, a forged signature (and the file route refuses it too).
    wrong = platform.http.post("/fn/dev/files-rt", files={"doc": ("a", b"x")},
                               data={"times": "many"})
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "times"
    foreign = platform.invoke("files-rt", {"doc": "https://example.com/cat.png"})
    assert foreign.status_code == 422 and foreign.json()["error"]["field"] == "doc"
    forged = url[:-2] + ("AA" if not url.endswith("AA") else "BB")
    assert platform.invoke("files-rt", {"doc": forged}).status_code == 422
    refused = download(forged)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["field"] == "token"

    # Expiry: the URL answers 403 once its TTL is past, and the file is collected.
    stored = list((platform.platform.home / "files" / "dev").rglob("*.json"))
    assert stored, "the output files are kept under THAW_HOME/files/<tenant>"
    until(lambda: download(url).status_code == 403, "the URL's expiry")
    assert "expired" in download(url).json()["error"]["message"]
    until(lambda: not any(p.exists() for p in stored), "the expired files' collection")


def test_a_cog_predictor_takes_and_returns_cog_paths(platform: RunningPlatform,
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "cog-files"
    shutil.copytree(FIXTURES / "cog_files", folder,
                    ignore=shutil.ignore_patterns("__pycache__"))
    deployed = thaw(cli_env(tmp_path, platform.url, platform.key), "deploy", "--force",
                    str(folder))
    assert deployed.returncode == 0, deployed.stderr
    url = "/fn/dev/cog-files/predictions"
    made = platform.http.post(url, json={"input": {"text": data_uri(b"quiet words")}})
    assert made.status_code == 200, made.text
    prediction = made.json()
    assert prediction["status"] == "succeeded", prediction
    output = prediction["output"]
    assert output.startswith(platform.platform.function_url + "/files/"), output
    assert download(output).content == b"QUIET WORDS"

    # Its output URL as the next prediction's input (cog clients pass URLs on).
    again = platform.http.post(url, json={"input": {"text": output, "upper": False}})
    assert again.status_code == 200, again.text
    assert download(again.json()["output"]).content == b"QUIET WORDS"

    missing = platform.http.post(url, json={"input": {"upper": True}})
    assert missing.status_code == 422 and missing.json()["field"] == "input.text"

    # The real Replicate client: a file sent as a data URI, the output read as a file.
    client = replicate.Client(api_token=platform.key, base_url=platform.url)
    source = tmp_path / "in.txt"
    source.write_bytes(b"from replicate")
    with source.open("rb") as handle:
        result = client.run("dev/cog-files", input={"text": handle},
                            file_encoding_strategy="base64")
    # The client wraps only https URLs in a FileOutput; this platform's are http.
    assert isinstance(result, str) and not isinstance(result, FileOutput)
    assert download(result).content == b"FROM REPLICATE"
    wrapped = FileOutput(result, client)  # what an https deployment's caller gets
    assert wrapped.read() == b"FROM REPLICATE"
