"""`dermscan FOLDER`: classify every image of a folder into a CSV (and an HTML report, an ISIC file)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermscan", description="Classify every dermoscopy image in a folder. "
                                "Decision support, not a diagnosis.")
    p.add_argument("folder")
    p.add_argument("--model", help="ONNX bundle, or a shipped model name (default, convnext)")
    p.add_argument("--backend", default="auto", help="auto, tensorrt, cuda, cpu, ort-trt")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--recursive", action="store_true", help="scan subfolders too")
    p.add_argument("--out", default="dermscan_results.csv", help="results CSV (default: %(default)s)")
    p.add_argument("--html", help="self-contained HTML report")
    p.add_argument("--isic", help="ISIC challenge CSV (image, MEL, NV, BCC, AKIEC, BKL, DF, VASC)")
    p.add_argument("--resume", action="store_true", help="scan only the files not yet in --out")
    p.add_argument("--tta", default="none", choices=("none", "flip"), help="test-time flips (4x the compute)")
    p.add_argument("--limit", type=int, help="scan at most N images (after sorting)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0: ONNX Runtime's choice)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from engines.bundle import BundleError
    from engines.scan.discover import find_images
    from engines.scan.report_html import write_html
    from engines.scan.results import OutputError, ResultsWriter, check_writable, read_results, write_isic
    from engines.scan.scanner import scan
    from engines.select import open_engine

    a = build_parser().parse_args(argv)
    folder = Path(a.folder)
    try:
        if not folder.is_dir():
            raise OutputError(f"{folder}: folder not found")
        if a.batch < 1:
            raise OutputError(f"--batch must be at least 1, not {a.batch}")
        out = Path(a.out)
        for target in filter(None, (out, a.html and Path(a.html), a.isic and Path(a.isic))):
            check_writable(target)
        done = {r.file for r in read_results(out)} if a.resume else set()
        choice = open_engine(a.model, a.backend, a.threads, max_batch=max(a.batch, 1))
        engine = choice.engine
        files, warnings = find_images(folder, a.recursive)
        if a.limit is not None:
            files = files[:a.limit]
        todo = [f for f in files if f.relative_to(folder).as_posix() not in done]
        log = (lambda *_: None) if a.quiet else (lambda m: print(m, file=sys.stderr))
        log(f"dermscan: {engine.describe()} ({choice.reason})")
        for w in warnings:
            log(f"warning: {w}")
        if done:
            log(f"resuming: {len(files) - len(todo)} of {len(files)} images already in {out}")
        writer = ResultsWriter(out, resume=a.resume)
        try:
            stats = scan(todo, folder, engine, writer, a.batch, a.tta, progress=not a.quiet)
        finally:
            writer.close()
        rows = read_results(out)
        if a.isic:
            write_isic(rows, Path(a.isic))
        if a.html:
            write_html(Path(a.html), rows, folder, engine.bundle, engine.backend, str(a.model or "default"), a.tta)
    except (BundleError, OutputError) as e:
        print(f"dermscan: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dermscan: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dermscan: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    ok = sum(r.status == "ok" for r in rows)
    err = len(rows) - ok
    flagged = sum(r.melanoma_flag for r in rows)
    print(f"dermscan: {len(rows)} images in {out}: {ok} classified, {err} errors, {flagged} melanoma suspects; "
          f"this run {stats.ok + stats.errors} images at {stats.images_per_s:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
