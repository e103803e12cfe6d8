"""The HTML report: one self-contained file (thumbnails embedded), melanoma suspects first, sortable."""
from __future__ import annotations

import base64
import html
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import cv2

from engines.bundle import ModelBundle
from engines.fsutil import write_text
from engines.imageio import ImageReadError, load_rgb
from engines.labels import CLASS_CODES, class_name
from engines.scan.results import Row, printable

MAX_THUMBNAILS = 1500  # beyond this the report would weigh tens of MB; suspects get theirs first
THUMB = 72

VALIDATION_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
    "mel_recall_at_threshold": "melanoma recall at the threshold",
    "mel_specificity_at_threshold": "melanoma specificity at the threshold",
    "mel_recall": "melanoma recall at argmax",
}

NOTICE = ("Decision support, not a diagnosis. Every result must be reviewed by a qualified clinician; "
          "a lesion that is not flagged can still be a melanoma.")

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2733}
h1{margin-bottom:4px} .notice{background:#fff4e5;border:2px solid #e07b00;padding:10px 14px;font-weight:600;margin:12px 0}
table{border-collapse:collapse;font-size:13px} th,td{border-bottom:1px solid #dde3ea;padding:4px 8px;text-align:left}
th.s{cursor:pointer;user-select:none;background:#f2f5f8} th.s:hover{background:#e3e9f0}
tr.flag td{background:#fde8e8} .num{text-align:right;font-variant-numeric:tabular-nums}
img{width:%dpx;height:auto;border-radius:3px;display:block} .meta td{border:none;padding:2px 10px 2px 0}
.pill{display:inline-block;padding:1px 6px;border-radius:8px;background:#c62828;color:#fff;font-size:11px}
""" % THUMB

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th.s').forEach(function(th,i){th.addEventListener('click',function(){
  var idx=Array.prototype.indexOf.call(th.parentNode.children,th), b=t.tBodies[0], rows=Array.from(b.rows);
  var asc=th.dataset.dir!=='asc'; th.dataset.dir=asc?'asc':'desc';
  rows.sort(function(r1,r2){var a=r1.children[idx].dataset.v||r1.children[idx].textContent,
   c=r2.children[idx].dataset.v||r2.children[idx].textContent, x=parseFloat(a), y=parseFloat(c);
   if(!isNaN(x)&&!isNaN(y)) return asc?x-y:y-x; return asc?a.localeCompare(c):c.localeCompare(a);});
  rows.forEach(function(r){b.appendChild(r);});});});});
"""


def _thumb(path: Path) -> str | None:
    try:
        rgb = load_rgb(path)
    except ImageReadError:
        return None
    h, w = rgb.shape[:2]
    scale = THUMB * 2 / max(h, w)  # fit a 2*THUMB square whatever the aspect (a 1x40000 image stays tiny)
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 70])
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else None


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}%"


def render(rows: list[Row], folder: Path, bundle: ModelBundle, backend: str, model_path: str,
           tta: str = "none", paths: dict[str, Path] | None = None) -> str:
    """paths: row file name -> the file on disk (names that were not valid UTF-8 are escaped in the rows)."""
    paths = paths or {}
    where = printable(str(folder.resolve()))
    mel = CLASS_CODES.index("mel")
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: (not r.melanoma_flag, -r.probs[mel]))
    errors = sorted((r for r in rows if r.status != "ok"), key=lambda r: r.file)
    flagged = [r for r in ok if r.melanoma_flag]
    thumbs = {r.file: _thumb(paths.get(r.file, folder / r.file)) for r in ok[:MAX_THUMBNAILS]}
    counts = Counter(r.label for r in ok)
    e = html.escape
    v = bundle.validation or {}
    thr = bundle.threshold_for(tta)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>DermEdge scan: {e(where)}</title>",
           f"<style>{STYLE}</style></head><body>",
           f"<h1>DermEdge scan report</h1><div>{e(where)} &middot; "
           f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</div>",
           f"<div class='notice'>{e(NOTICE)}</div>",
           "<h2>Summary</h2><table class='meta'>",
           f"<tr><td>images scanned</td><td>{len(ok) + len(errors)}</td></tr>",
           f"<tr><td>classified</td><td>{len(ok)}</td></tr><tr><td>unreadable</td><td>{len(errors)}</td></tr>",
           f"<tr><td>melanoma suspects</td><td><b>{len(flagged)}</b> (p(mel) &ge; {thr:.4f})</td></tr>",
           "</table><h3>Per class (top-1 label)</h3><table><tr><th>class</th><th>code</th><th class='num'>images</th></tr>"]
    for c in CLASS_CODES:
        out.append(f"<tr><td>{e(class_name(c))}</td><td>{c}</td><td class='num'>{counts.get(c, 0)}</td></tr>")
    out += ["</table>", "<h2>Model</h2><table class='meta'>",
            f"<tr><td>model</td><td>{e(bundle.model_name)} @ {bundle.preprocess.size}px ({e(bundle.precision)}), "
            f"{e(model_path)}</td></tr><tr><td>backend</td><td>{e(backend)}</td></tr>",
            f"<tr><td>melanoma operating threshold</td><td>{thr:.4f} (test-time views: {e(tta)}; chosen on validation for "
            f"&ge;90% melanoma sensitivity)</td></tr><tr><td>temperature</td><td>{bundle.temperature:.3f}</td></tr>"]
    for k, label in VALIDATION_LABELS.items():
        if k in v:
            out.append(f"<tr><td>validation {label}</td><td>{_fmt(v[k])}</td></tr>")
    out.append(f"<tr><td>split manifest</td><td>{e(bundle.split_sha256[:12])}</td></tr></table>")
    out += ["<h2>Results</h2>",
            f"<p>Melanoma suspects first, then by p(mel). Click a column to sort. "
            f"{'Thumbnails for the first %d rows.' % MAX_THUMBNAILS if len(ok) > MAX_THUMBNAILS else ''}</p>",
            "<table class='sortable'><thead><tr><th></th><th class='s'>file</th><th class='s'>flag</th>"
            "<th class='s'>label</th><th class='s num'>confidence</th>"
            + "".join(f"<th class='s num' title='{e(class_name(c))}'>p({c})</th>" for c in CLASS_CODES)
            + "</tr></thead><tbody>"]
    for r in ok:
        t = thumbs.get(r.file)
        img = f"<img alt='' src='data:image/jpeg;base64,{t}'>" if t else ""
        flag = "<span class='pill'>MEL</span>" if r.melanoma_flag else ""
        out.append(f"<tr class='{'flag' if r.melanoma_flag else ''}'><td>{img}</td><td>{e(r.file)}</td>"
                   f"<td data-v='{int(r.melanoma_flag)}'>{flag}</td><td title='{e(class_name(r.label))}'>{r.label}</td>"
                   f"<td class='num' data-v='{r.confidence:.6f}'>{_fmt(r.confidence)}</td>"
                   + "".join(f"<td class='num' data-v='{p:.6f}'>{_fmt(p)}</td>" for p in r.probs) + "</tr>")
    out.append("</tbody></table>")
    out.append(f"<h2>Unreadable files ({len(errors)})</h2>")
    if errors:
        out.append("<table><tr><th>file</th><th>problem</th></tr>"
                   + "".join(f"<tr><td>{e(r.file)}</td><td>{e(r.error)}</td></tr>" for r in errors) + "</table>")
    else:
        out.append("<p>None.</p>")
    out.append(f"<div class='notice'>{e(NOTICE)}</div><script>{SCRIPT}</script></body></html>")
    return "\n".join(out)


def write_html(path: Path, rows: list[Row], folder: Path, bundle: ModelBundle, backend: str, model_path: str,
               tta: str = "none", paths: dict[str, Path] | None = None) -> None:
    from engines.scan.results import OutputError
    try:
        write_text(path, render(rows, folder, bundle, backend, model_path, tta, paths))
    except OSError as e:
        raise OutputError(f"{path}: cannot write the HTML report ({e.strerror or e})") from None
