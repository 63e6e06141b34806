"""``cli.py push`` and ``cli.py convert``: export (or convert) into a Hub-ready folder, then upload it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import FinetuneError
from .export import ExportError, convert, export_checkpoint
from .upload import check_target, push_folder, report_push
from .weights import check_model_name

__all__ = ["push_main", "convert_main"]


def _add_upload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against main instead")
    parser.add_argument("--retries", type=int, default=3, help="retries on connection errors and 429/5xx")
    parser.add_argument("--retry-wait", type=float, default=2.0, help="seconds before the first retry (doubles)")


def push_main(argv: list[str]) -> int:
    """``cli.py push``: export a fine-tuning checkpoint (or take an exported folder) and upload it."""
    parser = argparse.ArgumentParser(
        prog="cli.py push", description="Export a fine-tuning checkpoint (or take an exported folder) and upload it.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="Lightning checkpoint written by the fine-tuning module")
    source.add_argument("--folder", help="folder written by an earlier export (retry an upload)")
    parser.add_argument("--repo-id", required=True, help="owner/name on the Hub")
    parser.add_argument("--export-dir", help="where to export (default <ckpt dir>/hub_export/<name>)")
    parser.add_argument("--license", help="license for the card (default: the architecture's, else apache-2.0)")
    parser.add_argument("--export-only", action="store_true", help="write the folder, do not upload")
    _add_upload_args(parser)
    args = parser.parse_args(argv)
    try:
        check_target(args.repo_id, args.revision, args.create_pr)
        if args.folder and (args.export_dir or args.export_only or args.license):
            raise ExportError("--export-dir, --export-only and --license apply to --ckpt, not to --folder")
        if args.ckpt:
            ckpt = Path(args.ckpt)
            folder = Path(args.export_dir) if args.export_dir else ckpt.parent / "hub_export" / args.repo_id.split("/")[1]
            export_checkpoint(ckpt, folder, repo_id=args.repo_id, license=args.license)
            print(f"exported {ckpt} to {folder}")
        else:
            folder = Path(args.folder)
        if args.export_only:
            return 0
        info = _push_with_args(folder, args.repo_id, args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report_push(info, args.repo_id)
    return 0


def _push_with_args(folder: Path, repo_id: str, args: argparse.Namespace) -> Any:
    """``push_folder`` with the upload options ``_add_upload_args`` put on the command line."""
    return push_folder(folder, repo_id, private=args.private, revision=args.revision,
                       create_pr=args.create_pr, retries=args.retries, retry_wait=args.retry_wait)


def convert_main(argv: list[str]) -> int:
    """``cli.py convert``: official iRPE / SP-ViT checkpoint (file or URL) -> Hub-ready folder [-> push]."""
    parser = argparse.ArgumentParser(
        prog="cli.py convert",
        description="Convert an official iRPE / SP-ViT checkpoint (file or URL) into a Hub-ready folder, optionally push it.")
    parser.add_argument("--source", required=True, help="release .pth / .pth.tar / .safetensors file or URL")
    parser.add_argument("--model", required=True, help="registered model name, e.g. deit_small_patch16_224_ctx_product_50_shared_k")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--model-args", default="{}", help='JSON keyword overrides, e.g. \'{"img_size": 384}\'')
    parser.add_argument("--push", metavar="REPO_ID", help="also upload the folder to owner/name")
    _add_upload_args(parser)
    args = parser.parse_args(argv)
    try:
        try:
            model_args = json.loads(args.model_args)
        except json.JSONDecodeError as err:
            raise ExportError(f"--model-args {args.model_args!r}: not valid JSON ({err.msg})") from err
        if not isinstance(model_args, dict):
            raise ExportError(f"--model-args {args.model_args!r}: expected a JSON object")
        if args.push:
            check_target(args.push, args.revision, args.create_pr)
        check_model_name(args.model)
        out = convert(args.source, args.model, args.out, repo_id=args.push, model_args=model_args)
        print(f"converted {args.source} to {out}")
        if not args.push:
            return 0
        info = _push_with_args(out, args.push, args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report_push(info, args.push)
    return 0
