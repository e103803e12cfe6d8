"""The HTML report: one self-contained file (thumbnails embedded), melanoma suspects first, sortable."""
from __future__ import annotations

import base64
import html
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import cv2

from engines.bundle import ModelBundle
from engines.display import pct
from engines.fsutil import write_text
from engines.imageio import ImageReadError, load_rgb
from engines.labels import CLASS_CODES, class_name
from engines.scan.results import Row, printable

# Every melanoma suspect gets its picture; other rows get one while fewer than this many are shown. 64 px JPEGs
# at quality 60 weigh about 2.5 KB each in base64: a 10,015-image scan stays a self-contained file of ~15 MB.
MAX_UNFLAGGED_THUMBNAILS = 2000
THUMB = 64

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
th.s{cursor:pointer;user-select:none;background:#f2f5f8;white-space:nowrap} th.s:hover{background:#e3e9f0}
th.s[data-dir=asc]::after{content:" \\25B2"} th.s[data-dir=desc]::after{content:" \\25BC"}
tr.flag td{background:#fde8e8} .num{text-align:right;font-variant-numeric:tabular-nums}
img{width:%dpx;height:auto;border-radius:3px;display:block} .meta td{border:none;padding:2px 10px 2px 0}
.pill{display:inline-block;padding:1px 6px;border-radius:8px;background:#c62828;color:#fff;font-size:11px}
.filters{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #dde3ea;z-index:1}
.filters input,.filters select{margin-right:14px;font-size:13px} a{color:#1d4f91} tbody.pending{display:none}
""" % THUMB

# Numeric columns sort high-to-low on the first click (the suspects first), text columns A-Z. Rows are shown a
# page at a time and thumbnails decoded only for the page on screen: a 10,015-row report opens in about a second
# instead of laying out every row and decoding every picture first.
SCRIPT = """
var PAGE=500, page=0, tbl=document.getElementById('results'), body=tbl.tBodies[0], rows=Array.from(body.rows);
tbl.querySelectorAll('th.s').forEach(function(th){th.addEventListener('click',function(){
 var idx=Array.prototype.indexOf.call(th.parentNode.children,th), num=th.classList.contains('num');
 var asc=th.dataset.dir?th.dataset.dir!=='asc':!num;
 tbl.querySelectorAll('th.s').forEach(function(o){delete o.dataset.dir;}); th.dataset.dir=asc?'asc':'desc';
 rows.sort(function(r1,r2){var a=r1.children[idx].dataset.v||r1.children[idx].textContent,
  c=r2.children[idx].dataset.v||r2.children[idx].textContent, x=parseFloat(a), y=parseFloat(c);
  if(!isNaN(x)&&!isNaN(y)) return asc?x-y:y-x; return asc?a.localeCompare(c):c.localeCompare(a);});
 rows.forEach(function(r){body.appendChild(r);}); page=0; render();});});
function render(){
 var flagged=document.getElementById('f-flag').checked, cls=document.getElementById('f-class').value,
  q=document.getElementById('f-search').value.toLowerCase();
 var match=rows.filter(function(r){return (!flagged||r.classList.contains('flag'))&&(!cls||r.dataset.label===cls)&&
  (!q||r.dataset.file.toLowerCase().indexOf(q)>=0);});
 var pages=Math.max(1,Math.ceil(match.length/PAGE)); page=Math.min(page,pages-1);
 var shown=new Set(match.slice(page*PAGE,(page+1)*PAGE));
 rows.forEach(function(r){var on=shown.has(r); r.style.display=on?'':'none';
  if(on){var im=r.querySelector('img[data-src]'); if(im){im.src=im.dataset.src; im.removeAttribute('data-src');}}});
 body.classList.remove('pending');
 document.getElementById('f-count').textContent=match.length+' of '+rows.length+' rows match';
 document.getElementById('f-page').textContent='page '+(page+1)+' of '+pages;}
['f-flag','f-class','f-search'].forEach(function(id){document.getElementById(id).addEventListener('input',
 function(){page=0; render();});});
document.getElementById('f-prev').addEventListener('click',function(){if(page>0){page--; render();}});
document.getElementById('f-next').addEventListener('click',function(){page++; render();});
render();
"""


def _thumb(path: Path) -> str | None:
    try:
        rgb = load_rgb(path)
    except ImageReadError:
        return None
    h, w = rgb.shape[:2]
    scale = THUMB / max(h, w)  # fit a 2*THUMB square whatever the aspect (a 1x40000 image stays tiny)
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 60])
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else None


def _uri(path: Path) -> str:
    try:
        return path.resolve().as_uri()
    except ValueError:
        return ""


def render(rows: list[Row], folder: Path, bundle: ModelBundle, backend: str, model_path: str,
           tta: str = "none", paths: dict[str, Path] | None = None) -> str:
    """paths: row file name -> the file on disk (names that were not valid UTF-8 are escaped in the rows)."""
    paths = paths or {}
    where = printable(str(folder.resolve()))
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: (not r.melanoma_flag, -r.melanoma_score))
    errors = sorted((r for r in rows if r.status != "ok"), key=lambda r: r.file)
    flagged = [r for r in ok if r.melanoma_flag]
    pictured = flagged + [r for r in ok if not r.melanoma_flag][:MAX_UNFLAGGED_THUMBNAILS]
    thumbs = {r.file: _thumb(paths.get(r.file, folder / r.file)) for r in pictured}
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
           f"<tr><td>melanoma suspects</td><td><b>{len(flagged)}</b> (melanoma score &ge; {pct(thr)})</td></tr>",
           "</table><h3>Per class (top-1 label)</h3><table><tr><th>class</th><th>code</th><th class='num'>images</th></tr>"]
    for c in CLASS_CODES:
        out.append(f"<tr><td>{e(class_name(c))}</td><td>{c}</td><td class='num'>{counts.get(c, 0)}</td></tr>")
    out += ["</table>", "<h2>Model</h2><table class='meta'>",
            f"<tr><td>model</td><td>{e(bundle.model_name)} @ {bundle.preprocess.size}px ({e(bundle.precision)}), "
            f"{e(model_path)}</td></tr><tr><td>backend</td><td>{e(backend)}</td></tr>",
            f"<tr><td>melanoma operating threshold</td><td>{pct(thr)} (test-time views: {e(tta)}; chosen on validation "
            f"for &ge;90% melanoma sensitivity: most flagged lesions are not melanomas)</td></tr><tr><td>temperature</td><td>{bundle.temperature:.3f}</td></tr>"]
    for k, label in VALIDATION_LABELS.items():
        if k in v:
            out.append(f"<tr><td>validation {label}</td><td>{pct(v[k])}</td></tr>")
    out.append(f"<tr><td>split manifest</td><td>{e(bundle.split_sha256[:12])}</td></tr></table>")
    unpictured = len(ok) - len(pictured)
    out += ["<h2>Results</h2>",
            "<p>Melanoma suspects first, then by melanoma score (what the flag compares with the threshold"
            + ("" if not bundle.mel_flag_offsets else
               ": p(mel) re-weighted towards the training data's case mix, which ranks melanomas better")
            + "). Click a column to sort (numbers: highest first). "
            "File names open the image. 500 rows a page. Every suspect has its picture"
            + (f"; {unpictured} other rows have none, to keep this file small." if unpictured else ".") + "</p>",
            "<div class='filters'><label><input type='checkbox' id='f-flag'> melanoma suspects only</label> "
            "<label>label <select id='f-class'><option value=''>all</option>"
            + "".join(f"<option value='{c}'>{e(class_name(c))} ({c})</option>" for c in CLASS_CODES)
            + "</select></label> <label>file <input type='search' id='f-search' placeholder='part of a name'></label> "
            "<span id='f-count'></span> <button id='f-prev'>&#9664;</button> <span id='f-page'></span> "
            "<button id='f-next'>&#9654;</button></div>",
            "<table id='results'><thead><tr><th></th><th class='s'>file</th><th class='s num'>flag</th>"
            "<th class='s num' title='what the melanoma flag compares with the threshold'>mel score</th>"
            "<th class='s'>label</th><th class='s num'>confidence</th>"
            + "".join(f"<th class='s num' title='{e(class_name(c))}'>p({c})</th>" for c in CLASS_CODES)
            + "</tr></thead><tbody class='pending'>"]
    for r in ok:
        t = thumbs.get(r.file)
        img = f"<img alt='' data-src='data:image/jpeg;base64,{t}'>" if t else ""
        flag = "<span class='pill'>MEL</span>" if r.melanoma_flag else ""
        link = f"<a href='{e(_uri(paths.get(r.file, folder / r.file)))}'>{e(r.file)}</a>"
        out.append(f"<tr class='{'flag' if r.melanoma_flag else ''}' data-label='{r.label}' data-file='{e(r.file)}'>"
                   f"<td>{img}</td><td>{link}</td>"
                   f"<td data-v='{int(r.melanoma_flag)}'>{flag}</td>"
                   f"<td class='num' data-v='{r.melanoma_score:.6f}'>{pct(r.melanoma_score)}</td>"
                   f"<td title='{e(class_name(r.label))}'>{r.label}</td>"
                   f"<td class='num' data-v='{r.confidence:.6f}'>{pct(r.confidence)}</td>"
                   + "".join(f"<td class='num' data-v='{p:.6f}'>{pct(p)}</td>" for p in r.probs) + "</tr>")
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
