"""Model volumes and chunked uploads on the real platform: a 200 MB volume uploaded
once (a second `put` sends no chunk, an interrupted upload sends only what is left),
mounted read-only at /models in a function whose snapshot was built with it (a
restore answers what setup read) and in one that starts fresh (it reads the file at
call time too); a mounted volume cannot be removed; a deploy naming no such volume is
refused; a bundle past the single-request cap deploys through chunks, within the
tenant's max_bundle_bytes."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningPlatform
from tests.gateway.tenancy_helpers import new_tenant
from tests.ops.test_cli import cli_env, thaw
from thaw.core.bundle import MAX_BUNDLE_BYTES, limits_for
from thaw.core.errors import ThawError
from thaw.core.spec import pack_bundle
from thaw.ops.client import Client
from thaw.ops.uploads import CHUNK_BYTES, file_pieces, pack_large, put_volume, upload_pieces
from thaw.ops.uploads import deploy_chunked as deploy_chunks

VOLUME = "e2e-weights"
SEED = 17
# Four files, 200 MB in all; the largest is read by the functions.
FILES = {"model/weights-0.bin": 80_000_000, "model/weights-1.bin": 70_000_000,
         "tokenizer/vocab.bin": 49_999_000, "config.json": 1_000}

APP = '''
import hashlib
import os


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Reader:
    def setup(self):
        self.at_setup = digest("/models/model/weights-0.bin")

    def __call__(self, request):
        live = None
        if (request.json() or {}).get("live"):
            live = digest("/models/model/weights-0.bin")
        try:
            open("/models/new-file", "w")
            writable = True
        except OSError:
            writable = False
        return {"at_setup": self.at_setup, "live": live, "writable": writable}
'''


def _folder(tmp_path: Path) -> Path:
    rng = random.Random(SEED)
    root = tmp_path / "weights"
    for path, size in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(rng.randbytes(size))
    return root


def _function(tmp_path: Path, name: str, volume: str, snapshot: bool) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "thaw.toml").write_text(
        f'name = "{name}"\nhandler = "app:Reader"\n'
        + f'[resources]\ngpu_memory = 0\n[volumes]\n"/models" = "{volume}"\n'
        + ("" if snapshot else "[snapshot]\nenabled = false\n"))
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("volume"))


def test_a_volume_uploads_once_mounts_read_only_and_is_kept_while_mounted(
        platform: RunningPlatform, weights: Path, tmp_path: Path) -> None:
    client = Client(platform.url, platform.key)
    http = platform.http
    assert http.post("/v1/volumes", json={"name": VOLUME}).status_code == 201
    first = put_volume(client, VOLUME, weights)
    expected = sum(-(-size // CHUNK_BYTES) for size in FILES.values())
    assert first.chunks_total == expected and first.chunks_sent == expected
    assert first.bytes_sent == sum(FILES.values()) == 199_999_999 + 1
    assert (first.result["files"], first.result["size"]) == (4, sum(FILES.values()))

    # The same files again: nothing to send (the CLI says so), the manifest unchanged.
    env = cli_env(tmp_path, platform.url, platform.key)
    again = thaw(env, "volume", "put", VOLUME, str(weights))
    assert again.returncode == 0, again.stderr
    assert f"sent 0 of {expected} chunks" in again.stdout, again.stdout
    assert put_volume(client, VOLUME, weights).chunks_sent == 0
    listed = http.get(f"/v1/volumes/{VOLUME}").json()
    assert listed["manifest_digest"] == first.result["manifest_digest"]
    assert sorted(f["path"] for f in listed["contents"]) == sorted(FILES)

    # An upload interrupted after two chunks sends only the rest when run again.
    extra = tmp_path / "extra.bin"
    extra.write_bytes(random.Random(SEED + 1).randbytes(5 * CHUNK_BYTES))
    pieces = file_pieces(extra)
    sent: list[str] = []

    def interrupt(piece: object) -> None:
        sent.append("x")
        if len(sent) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upload_pieces(client, pieces, "extra", on_sent=interrupt)
    assert upload_pieces(client, pieces, "extra").chunks_sent == len(pieces) - 2

    # Restored: setup() read the file in the snapshot build, with the volume mounted.
    restored = _function(tmp_path, "e2e-volume-reader", VOLUME, snapshot=True)
    made = platform.deploy(restored)
    assert made.status_code == 201, made.text
    assert made.json()["start_mode"] == "restore", made.json()
    answer = platform.invoke("e2e-volume-reader", {})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Thaw-Start"] == "restore"
    want = _sha(weights / "model/weights-0.bin")
    assert answer.json()["at_setup"] == want

    # Fresh: mounted at the start, readable at call time, and read-only.
    fresh = _function(tmp_path, "e2e-volume-fresh", VOLUME, snapshot=False)
    assert platform.deploy(fresh).status_code == 201
    answer = platform.invoke("e2e-volume-fresh", {"live": True})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Thaw-Start"] == "fresh"
    assert answer.json() == {"at_setup": want, "live": want, "writable": False}

    # Mounted: not removed (409 naming a function); unmounted: removed.
    refused = http.delete(f"/v1/volumes/{VOLUME}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["field"] == "volume"
    assert "e2e-volume-" in refused.json()["error"]["message"]
    for name in ("e2e-volume-reader", "e2e-volume-fresh"):
        assert http.delete(f"/v1/functions/{name}").status_code == 204
    assert http.delete(f"/v1/volumes/{VOLUME}").status_code == 204
    assert http.get(f"/v1/volumes/{VOLUME}").status_code == 404


def test_a_deploy_naming_no_such_volume_is_refused(platform: RunningPlatform,
                                                   tmp_path: Path) -> None:
    folder = _function(tmp_path, "e2e-volume-missing", "no-such-volume", snapshot=False)
    refused = platform.deploy(folder)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["field"] == "volumes" and "no-such-volume" in error["message"]


def test_a_chunk_is_checked_against_its_digest(platform: RunningPlatform) -> None:
    wrong = platform.http.put(f"/v1/blobs/{'0' * 64}", content=b"not that",
                              headers={"Content-Type": "application/octet-stream"})
    assert wrong.status_code == 400 and wrong.json()["error"]["field"] == "digest"
    big = platform.http.put(f"/v1/blobs/{'0' * 64}", content=b"x" * (CHUNK_BYTES + 1),
                            headers={"Content-Type": "application/octet-stream"})
    assert big.status_code == 413


def test_a_bundle_past_the_single_request_cap_deploys_through_chunks(
        platform: RunningPlatform, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "app.py").write_text(
        "import hashlib\n\nclass Big:\n    def setup(self):\n"
        "        self.sha = hashlib.sha256(open('blob.bin', 'rb').read()).hexdigest()\n\n"
        "    def __call__(self, request):\n        return {'sha': self.sha}\n")
    (folder / "thaw.toml").write_text(
        'name = "e2e-big-bundle"\nhandler = "app:Big"\n[resources]\ngpu_memory = 0\n')
    blob = random.Random(SEED + 2).randbytes(MAX_BUNDLE_BYTES + 4 * 1024 * 1024)
    (folder / "blob.bin").write_bytes(blob)
    bundle = pack_bundle(str(folder), limits_for(2 * MAX_BUNDLE_BYTES))
    assert len(bundle) > MAX_BUNDLE_BYTES
    client = Client(platform.url, platform.key)
    # In one request: past the gateway's cap.
    assert platform.http.post("/v1/functions", content=bundle, headers={
        "Content-Type": "application/gzip"}).status_code == 413
    # Through chunks: past the tenant's default quota, refused naming it.
    with pytest.raises(ThawError, match="max_bundle_bytes"):
        deploy_chunks(client, bundle)
    env = cli_env(tmp_path, platform.url, platform.key)
    refused = thaw(env, "deploy", str(folder))
    assert refused.returncode != 0
    assert "max_bundle_bytes" in refused.stderr, refused.stderr
    quota = platform.http.put("/v1/tenants/dev/storage-quota",
                              json={"max_bundle_bytes": "256MiB"})
    assert quota.status_code == 200, quota.text
    try:
        # Packed under the tenant's quota now: the same bytes (packing is reproducible).
        assert pack_large(client, folder) == bundle
        report = deploy_chunks(client, bundle)
        assert report.chunks_sent == 0  # the refused attempt had sent them all
        fn = report.result
        assert fn["name"] == "e2e-big-bundle" and fn["state"] == "ready", fn
        answer = platform.invoke("e2e-big-bundle", {})
        assert answer.status_code == 200, answer.text
        assert answer.json()["sha"] == hashlib.sha256(blob).hexdigest()
        again = deploy_chunks(client, bundle).result
        assert again["unchanged"] is True and again["version"] == fn["version"]
        # `thaw deploy` of the folder takes the same road: nothing left to send.
        by_cli = thaw(env, "deploy", str(folder))
        assert by_cli.returncode == 0, by_cli.stderr
        chunks = len(bundle) // CHUNK_BYTES + 1
        assert f"sent 0 of {chunks} chunks" in by_cli.stderr, by_cli.stderr
        assert f"unchanged, version {fn['version']} kept" in by_cli.stdout
    finally:
        platform.http.put("/v1/tenants/dev/storage-quota", json={})
        platform.http.delete("/v1/functions/e2e-big-bundle")


def test_storage_routes_need_their_scopes(platform: RunningPlatform) -> None:
    anonymous = httpx.get(f"{platform.url}/v1/volumes")
    assert anonymous.status_code == 401
    usage = platform.http.get("/v1/storage").json()
    assert usage["max_storage_bytes"] > 0 and usage["stored_bytes"] >= 0


def test_storage_is_per_tenant_and_bounded_by_its_quota(platform: RunningPlatform) -> None:
    tenant = new_tenant(platform)
    first, second = b"a" * 1000, b"b" * 1000
    digests = [hashlib.sha256(d).hexdigest() for d in (first, second)]
    # The operator's tenant stores the first chunk; the new tenant still lacks it.
    assert platform.http.put(f"/v1/blobs/{digests[0]}", content=first).status_code in (
        200, 201)
    missing = tenant.http.post("/v1/blobs/missing", json={"digests": digests}).json()
    assert missing["missing"] == digests
    quota = platform.http.put(f"/v1/tenants/{tenant.tenant}/storage-quota",
                              json={"max_storage_bytes": 1500})
    assert quota.status_code == 200 and quota.json()["max_storage_bytes"] == 1500
    assert tenant.http.put(f"/v1/blobs/{digests[0]}", content=first).status_code == 201
    refused = tenant.http.put(f"/v1/blobs/{digests[1]}", content=second)
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"]["field"] == "max_storage_bytes"
    assert "max_storage_bytes" in refused.json()["error"]["message"]
    assert tenant.http.get("/v1/storage").json()["stored_bytes"] == 1000
    # Only the operator sets quotas.
    assert tenant.http.put(f"/v1/tenants/{tenant.tenant}/storage-quota",
                           json={}).status_code == 403
    tenant.http.close()


HF_APP = '''
import os

import torch
from transformers import AutoModel, AutoTokenizer


class Embed:
    def setup(self):
        path = "/models/tiny-bert"  # a local folder in the volume: nothing downloaded
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def __call__(self, request):
        with torch.no_grad():
            out = self.model(**self.tok("hello world", return_tensors="pt"))
        return {"sum": float(out.last_hidden_state.sum()), "hf_home": os.environ["HF_HOME"]}
'''


def _tiny_bert(folder: Path) -> float:
    """A small random BERT and its tokenizer saved as from_pretrained reads them; the
    sum of its output for "hello world"."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(SEED)
    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)).eval()
    model.save_pretrained(str(folder))
    tok = BertTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        return float(model(**tok("hello world", return_tensors="pt")).last_hidden_state.sum())


def test_from_pretrained_loads_offline_from_a_volume(platform: RunningPlatform,
                                                     tmp_path: Path) -> None:
    want = _tiny_bert(tmp_path / "upload" / "tiny-bert")
    http = platform.http
    assert http.post("/v1/volumes", json={"name": "e2e-hf"}).status_code == 201
    put_volume(Client(platform.url, platform.key), "e2e-hf", tmp_path / "upload" / "tiny-bert",
               prefix="tiny-bert")
    folder = tmp_path / "e2e-hf-embed"
    folder.mkdir()
    (folder / "app.py").write_text(HF_APP)
    (folder / "thaw.toml").write_text(
        'name = "e2e-hf-embed"\nhandler = "app:Embed"\n[resources]\ngpu_memory = 0\n'
        'memory = "2GiB"\n[volumes]\n"/models" = "e2e-hf"\n'
        '[env]\nHF_HOME = "/models/hf-home"\nHF_HUB_OFFLINE = "1"\n'
        'TRANSFORMERS_OFFLINE = "1"\n')
    try:
        made = platform.deploy(folder)
        assert made.status_code == 201 and made.json()["state"] == "ready", made.text
        answer = platform.invoke("e2e-hf-embed", {})
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Thaw-Start"] == "restore"
        assert answer.json()["hf_home"] == "/models/hf-home"
        assert abs(answer.json()["sum"] - want) < 1e-3
    finally:
        http.delete("/v1/functions/e2e-hf-embed")
        http.delete("/v1/volumes/e2e-hf")
