"""`dermscan FOLDER`: classify every image of a folder into a CSV (and an HTML report, an ISIC file)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.select import PRECISIONS
from engines.version import VersionAction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermscan", description="Classify every dermoscopy image in a folder. "
                                "Decision support, not a diagnosis.")
    p.add_argument("--version", action=VersionAction, help="version, shipped models and their ONNX sha256")
    p.add_argument("folder")
    p.add_argument("--model", help="ONNX bundle, or a shipped model name (default, convnext)")
    p.add_argument("--backend", default="auto", help="auto, tensorrt, cuda, cpu, ort-trt")
    p.add_argument("--precision", choices=PRECISIONS, help="run the gated file of this precision beside the model "
                   "(M.fp16.onnx, M.int8.onnx; default: the file as given)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--recursive", action="store_true", help="scan subfolders too")
    p.add_argument("--out", default="dermscan_results.csv", help="results CSV (default: %(default)s)")
    p.add_argument("--html", help="self-contained HTML report")
    p.add_argument("--isic", help="ISIC challenge CSV (image, MEL, NV, BCC, AKIEC, BKL, DF, VASC)")
    p.add_argument("--resume", action="store_true", help="scan only the files not yet in --out (errors are retried)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--tta", default="none", choices=("none", "flip"), help="test-time flips (4x the compute)")
    p.add_argument("--limit", type=int, help="scan at most N images (after sorting)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0: ONNX Runtime's choice)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="scan on Ray: no ADDRESS starts a local instance; auto or ray://host:port joins a cluster "
                        "(every node must see FOLDER at the same path)")
    p.add_argument("--ray-actors", type=int, default=0, help="Ray: inference actors (default: one per core locally)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from engines.bundle import BundleError
    from engines.fsutil import sha256_file
    from engines.scan.discover import find_images
    from engines.scan.outputs import OutputLock, check_existing, check_paths
    from engines.scan.report_html import write_html
    from engines.scan.results import (OutputError, ResultsWriter, Row, ScanIdentity, printable, read_results,
                                      row_name, write_isic)
    from engines.scan.scanner import scan
    from engines.select import open_engine, resolve_model, with_precision

    a = build_parser().parse_args(argv)
    folder = Path(a.folder)
    log = (lambda *_: None) if a.quiet else (lambda m: print(printable(m), file=sys.stderr))
    try:
        if not folder.is_dir():
            raise OutputError(f"{folder}: folder not found")
        if a.batch < 1:
            raise OutputError(f"--batch must be at least 1, not {a.batch}")
        if a.limit is not None and a.limit < 0:
            raise OutputError(f"--limit must be 0 or more, not {a.limit}")
        out, html, isic = Path(a.out), a.html and Path(a.html), a.isic and Path(a.isic)
        found = find_images(folder, a.recursive)
        files = found.files if a.limit is None else found.files[:a.limit]
        check_paths(out, html, isic, found.files)
        with OutputLock(out):
            check_existing(out, html, isic, a.resume, a.overwrite)
            # The model is loaded and checked before any output is touched.
            model_path = with_precision(resolve_model(a.model), a.precision)
            choice = open_engine(model_path, a.backend, a.threads, max_batch=max(a.batch, 1), precision=a.precision)
            engine = choice.engine
            identity = ScanIdentity(model_sha256=sha256_file(model_path), model=str(a.model or "default"),
                                    folder=str(folder.resolve()), recursive=a.recursive, tta=a.tta,
                                    mel_threshold=engine.bundle.threshold_for(a.tta))
            log(f"dermscan: {engine.describe()} ({choice.reason})")
            for w in found.warnings:
                log(f"warning: {w}")
            if found.other_files:
                log(f"note: {found.other_files} files that are not images were left out")
            writer = ResultsWriter(out, identity, resume=a.resume)
            done = writer.done
            todo = [f for f in files if row_name(f, folder) not in done]
            if done:
                log(f"resuming: {len(files) - len(todo)} of {len(files)} images already in {out}")
            try:
                writer.append([Row(row_name(d, folder) + "/", "error",
                                   f"{d}: {why}; its images were not scanned") for d, why in found.bad_folders])
                if a.ray:
                    from engines.scan.ray_scan import scan_ray
                    stats = scan_ray(todo, folder, model_path, engine.bundle.preprocess, writer, a.batch, a.tta,
                                     a.ray, a.ray_actors, a.backend, progress=not a.quiet)
                else:
                    stats = scan(todo, folder, engine, writer, a.batch, a.tta, progress=not a.quiet)
            finally:
                writer.close()
            rows = read_results(out)
            if isic:
                write_isic(rows, isic)
            if html:
                paths = {row_name(f, folder): f for f in found.files}
                write_html(html, rows, folder, engine.bundle, engine.backend, str(a.model or "default"), a.tta,
                           paths)
    except (BundleError, OutputError) as e:
        print(f"dermscan: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        where = e.filename or a.out
        print(printable(f"dermscan: error: {where}: {e.strerror or e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dermscan: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    ok = sum(r.status == "ok" for r in rows)
    err = len(rows) - ok
    flagged = sum(r.melanoma_flag for r in rows)
    print(printable(f"dermscan: {len(rows)} images in {out}: {ok} classified, {err} errors, {flagged} melanoma "
                    f"suspects; this run {stats.ok + stats.errors} images at {stats.images_per_s:.1f} images/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
