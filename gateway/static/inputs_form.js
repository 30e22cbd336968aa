// thaw dashboard: a form built from the selected function's input schema (docs/function-api.md),
// one field per input, posted as the JSON body of the same call the invoke box makes.
// The gateway judges the values (the form is `novalidate`: its limits are hints); a 422
// is shown beside the field it names. Uses el(), $ and invokeSelected() of dashboard.js.
"use strict";

// The schema of one input with Optional's null branch set aside: {"anyOf": [X, null]} is X.
function formBranch(p) {
  if (Array.isArray(p.anyOf)) {
    const real = p.anyOf.filter((b) => b && typeof b === "object" && b.type !== "null");
    if (real.length === 1) return {...real[0], ...("default" in p ? {default: p.default} : {})};
  }
  return p;
}

// What kind of control an input gets: select (choices), checkbox, number, text, or json
// (arrays, objects and anything else without a simpler control).
function formKind(p) {
  if (Array.isArray(p.enum)) return "select";
  if (p.type === "boolean") return "checkbox";
  if (p.type === "integer" || p.type === "number") return "number";
  if (p.type === "string") return "text";
  return "json";
}

function formControl(name, p, kind, required) {
  const id = `input-${name}`;
  const has = "default" in p && p.default !== null;
  let control;
  if (kind === "select") {
    control = el("select", {id, name});
    // Left out (an empty value) only where nothing else stands for it.
    if (!required && !has) control.append(el("option", {value: "", text: "—"}));
    p.enum.forEach((v, i) => {
      const option = el("option", {value: String(i), text: JSON.stringify(v)});
      if (has && JSON.stringify(v) === JSON.stringify(p.default)) option.selected = true;
      control.append(option);
    });
  } else if (kind === "checkbox") {
    control = el("input", {id, name, type: "checkbox"});
    control.checked = has && p.default === true;
  } else if (kind === "number") {
    control = el("input", {id, name, type: "number",
                           step: p.type === "integer" ? "1" : "any"});
    if ("minimum" in p) control.min = String(p.minimum);
    if ("maximum" in p) control.max = String(p.maximum);
    if (has) control.value = String(p.default);
  } else if (kind === "text") {
    control = el("input", {id, name, type: "text"});
    if (typeof p.pattern === "string") control.pattern = p.pattern;
    if (typeof p.minLength === "number") control.minLength = p.minLength;
    if (typeof p.maxLength === "number") control.maxLength = p.maxLength;
    if (has) control.value = String(p.default);
  } else {
    control = el("textarea", {id, name, rows: "2", spellcheck: "false",
                              placeholder: p.type === "array" ? "[ ... ] (JSON)" : "JSON"});
    if (has) control.value = JSON.stringify(p.default);
  }
  if (required) control.required = true;
  control.dataset.kind = kind;
  return control;
}

// The form's fields for `f` (rebuilt only when the function or its schema changes, so
// what the user typed stays while the page refreshes).
function renderInputsForm(f) {
  const form = $("#inputs-form");
  const schema = f.inputs;
  const props = schema && schema.properties && typeof schema.properties === "object"
    ? schema.properties : null;
  form.hidden = !props;
  if (!props) { form.dataset.for = ""; return; }
  const key = `${f.name}\n${JSON.stringify(schema)}`;
  if (form.dataset.for === key) return;
  form.dataset.for = key;
  const fields = form.querySelector(".fields");
  fields.textContent = "";
  const required = new Set(Array.isArray(schema.required) ? schema.required : []);
  for (const [name, raw] of Object.entries(props)) {
    const p = formBranch(raw && typeof raw === "object" ? raw : {});
    const kind = formKind(p);
    const must = required.has(name);
    const label = el("label", {for: `input-${name}`}, el("code", {text: name}));
    if (must) label.append(el("span", {class: "required", title: "required", text: " *"}));
    fields.append(el("div", {class: "field", "data-field": name},
      label, formControl(name, p, kind, must),
      el("span", {class: "muted small", text: p.description || ""}),
      el("span", {class: "field-error", role: "alert"})));
  }
}

class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

// The JSON body the form stands for. An empty field is left out (its default applies,
// or the gateway names a required one as missing).
function formBody(form, schema) {
  const body = {};
  for (const control of form.querySelectorAll("[data-kind]")) {
    const name = control.name;
    const p = formBranch(schema.properties[name] || {});
    const kind = control.dataset.kind;
    if (kind === "checkbox") { body[name] = control.checked; continue; }
    const text = control.value;
    if (text === "") continue;
    if (kind === "select") body[name] = p.enum[Number(text)];
    else if (kind === "number") body[name] = Number(text);
    else if (kind === "text") body[name] = text;
    else {
      try { body[name] = JSON.parse(text); } catch {
        throw new FieldError(name, "not valid JSON");
      }
    }
  }
  return body;
}

function showFieldError(form, field, message) {
  const top = String(field).split(".")[0];
  const row = form.querySelector(`.field[data-field="${CSS.escape(top)}"]`);
  if (!row) return false;
  row.classList.add("invalid");
  row.querySelector(".field-error").textContent = message;
  return true;
}

async function submitInputsForm() {
  const f = state.snapshot && state.snapshot.functions.find((x) => x.name === state.selected);
  const form = $("#inputs-form");
  if (!f || !f.inputs || !f.inputs.properties) return;
  for (const row of form.querySelectorAll(".field")) {
    row.classList.remove("invalid");
    row.querySelector(".field-error").textContent = "";
  }
  let body;
  try {
    body = formBody(form, f.inputs);
  } catch (err) {
    if (err instanceof FieldError) { showFieldError(form, err.field, err.message); return; }
    throw err;
  }
  const text = JSON.stringify(body);
  $("#invoke-body").value = JSON.stringify(body, null, 2);  // the call, as the box shows it
  const answer = await invokeSelected(text);
  const error = answer && answer.json && answer.json.error;
  if (answer && answer.status === 422 && error && error.field) {
    showFieldError(form, error.field, error.message || "invalid");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#inputs-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submitInputsForm();
  });
});
