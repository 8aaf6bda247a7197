"""The pages the server shows: a drop-images page and API docs, self-contained (no CDN, no external
resource; Content-Security-Policy as strict as the HTML report's, plus the page's one hashed script
and requests to its own origin), and the OpenAPI document they describe."""

from __future__ import annotations

import base64
import hashlib
import html
from typing import Any

SCRIPT = """
const drop = document.getElementById('drop'), pick = document.getElementById('pick'), out = document.getElementById('out');
function cell(text) { const td = document.createElement('td'); td.textContent = text; return td; }
async function send(files) {
  const form = new FormData();
  for (const f of files) form.append('images', f, f.name);
  const key = document.getElementById('key').value, headers = key ? {Authorization: 'Bearer ' + key} : {};
  const r = await fetch('v1/detect', {method: 'POST', body: form, headers: headers});
  const body = await r.json();
  if (!r.ok) { const p = document.createElement('p'); p.className = 'err'; p.textContent = body.error; out.prepend(p); return; }
  body.forEach((rec, i) => {
    const row = document.createElement('tr'), img = document.createElement('img'), td = document.createElement('td');
    img.src = URL.createObjectURL(files[i]); img.onload = () => URL.revokeObjectURL(img.src); td.appendChild(img); row.appendChild(td);
    row.appendChild(cell(rec.path));
    const v = cell(rec.error ? 'error' : rec.verdict); v.className = rec.error ? 'err' : rec.verdict; row.appendChild(v);
    row.appendChild(cell(rec.error || (rec.class + '  p_ood ' + (rec.p_ood ?? '') + '  ' + rec.rule + ' ' + (rec[rec.rule + '_score'] ?? ''))));
    out.prepend(row);
  });
}
drop.addEventListener('dragover', e => { e.preventDefault(); });
drop.addEventListener('drop', e => { e.preventDefault(); send([...e.dataTransfer.files]); });
pick.addEventListener('change', () => send([...pick.files]));
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
INDEX_CSP = (f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; img-src blob:; "
             "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:980px;padding:0 16px;color:#1a202c}"
       "#drop{border:2px dashed #a0aec0;border-radius:8px;padding:28px;text-align:center;margin:12px 0}"
       "td{padding:4px 10px;border-bottom:1px solid #edf2f7;overflow-wrap:anywhere}img{width:72px;height:72px;object-fit:contain}"
       ".ID{color:#2b6cb0;font-weight:600}.OOD{color:#c53030;font-weight:600}.err{color:#975a16}"
       "code,pre{font-family:ui-monospace,Menlo,monospace;font-size:12px}pre{background:#f7fafc;padding:8px;overflow:auto}")
INDEX_HTML = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>clipn serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>
<h1>clipn: ID or OOD?</h1><p>Drop images below (or pick them); each gets its verdict. <a href="docs">API docs</a></p>
<p><label>API key (if the server needs one): <input id="key" type="password" autocomplete="off"></label></p>
<div id="drop">drop images here, or <input id="pick" type="file" multiple accept="image/*"></div>
<table><tbody id="out"></tbody></table><script>{SCRIPT}</script></body></html>"""


def openapi(info: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the endpoints (written by hand: there are few)."""
    error = {"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    secured = [{"bearer": []}]
    detect = {
        "summary": "ID/OOD verdicts for uploaded images: the records 'clipn detect --format json' prints, in request order",
        "security": secured,
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
                "names": {"type": "array", "items": {"type": "string"}, "description": "the records' path, one per image"}}}},
        }},
        "responses": {"200": {"description": "one record per image (an undecodable image: {path, error})",
                              "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}},
                      **{code: error for code in ("400", "401", "408", "413", "415", "429", "503")}},
    }

    def get(summary: str, kind: str = "application/json", security: bool = False) -> dict[str, Any]:
        op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK", "content": {kind: {}}}}}
        if security:
            op["security"] = secured
            op["responses"]["401"] = error
        return {"get": op}

    return {
        "openapi": "3.1.0",
        "info": {"title": "clipn serve", "version": str(info.get("version", ""))},
        "paths": {
            "/v1/detect": {"post": detect},
            "/healthz": get("the process is up"),
            "/readyz": get("model and heads are loaded and the server is not stopping (else 503)"),
            "/v1/info": get("version, weights fingerprint, classes, rule, calibration alpha, limits", security=True),
            "/metrics": get("Prometheus metrics", "text/plain", security=True),
            "/openapi.json": get("this document"),
            "/docs": get("these docs as a page", "text/html"),
            "/": get("a page to drop images on", "text/html"),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "only when the server has a key ($CLIPN_API_KEY or --api-key-file)"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}},
        },
    }


def docs_html(document: dict[str, Any]) -> str:
    """The OpenAPI document as a plain page: one section per endpoint, no script."""
    parts = []
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            codes = ", ".join(op["responses"])
            parts.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p>{html.escape(op['summary'])}</p><p>Responses: {codes}</p>")
            if "requestBody" in op:
                parts.append("<p>Body: " + ", ".join(f"<code>{html.escape(k)}</code>" for k in op["requestBody"]["content"]) + "</p>")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>clipn serve API</title><style>{CSS}</style></head>"
            f"<body><h1>clipn serve API {html.escape(document['info']['version'])}</h1><p>Machine-readable: <a href=\"openapi.json\">openapi.json</a></p>"
            + "".join(parts) + "</body></html>")
