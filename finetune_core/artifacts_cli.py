"""CLI commands for artifacts: export, predict, models. Wired into finetune_core.cli by add_commands.

Each command sets `handler` on its parsed arguments; the handler prints JSON, returns 0 and raises
FinetuneError subclasses on bad input (the CLI prints those as one line and exits 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ConfigError, DataError
from .export import DEFAULT_GATE_POINTS


def add_commands(subparsers) -> None:
    """Add `export`, `predict` and `models` to an argparse subparsers object."""
    export = subparsers.add_parser("export", help="export a trained model into a new registered version")
    export.add_argument("--model", required=True, help="the trained model folder, RUN_DIR/model")
    export.add_argument("--name", required=True, help="registry name to add a version to")
    export.add_argument("--variants", default="onnx,torchscript,int8,bf16", help="comma-separated: onnx, torchscript, int8, "
                        "bf16 (text-generation models: always pytorch and onnx-genai, proven on the run's held-out prompts)")
    export.add_argument("--validation", help="JSONL with text and label; image models: an image list (image, label) or a "
                        "class folder (default: RUN_DIR/splits/validation.jsonl)")
    column_flags(export)
    export.add_argument("--gate", type=float, default=DEFAULT_GATE_POINTS, help="accuracy points int8/bf16 may lose vs fp32")
    export.set_defaults(handler=_export)

    predict = subparsers.add_parser("predict", help="predict with a registered model")
    predict.add_argument("--model", required=True, help="NAME, NAME:vN, NAME:latest or NAME:production")
    predict.add_argument("--variant", help="pytorch, onnx, torchscript, int8, bf16, distilled or distilled-int8 "
                         "(default: the fastest accepted one, as measured at export)")
    predict.add_argument("--top-k", type=int, default=None, help="how many label scores to return per input")
    predict.add_argument("--max-new-tokens", type=int, default=64, help="text-generation models: the longest answer")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="texts; for image models, image files")
    predict.set_defaults(handler=_predict)

    models = subparsers.add_parser("models", help="list, show, promote, roll back or delete registered models")
    actions = models.add_subparsers(dest="action")
    actions.add_parser("list", help="every model with its versions and aliases")
    show = actions.add_parser("show", help="a model's versions, or one version's manifest with NAME:VERSION")
    show.add_argument("name", metavar="NAME[:VERSION]")
    promote = actions.add_parser("promote", help="make a version the production one")
    promote.add_argument("name")
    promote.add_argument("version")
    rollback = actions.add_parser("rollback", help="point production back at the previous production version")
    rollback.add_argument("name")
    delete = actions.add_parser("delete", help="delete a version (the production one only with --force)")
    delete.add_argument("name")
    delete.add_argument("version")
    delete.add_argument("--force", action="store_true", help="also delete the production version")
    models.set_defaults(handler=_models, action="list")


def column_flags(parser: argparse.ArgumentParser, remembered: bool = True) -> None:
    """--text-column, --label-column, --image-column: the same flags on every command that reads a labelled file.

    Training defaults to text/label/image; later commands default to the columns the model was trained with.
    """
    for flag, what, default in (("--text-column", "the text", "text"), ("--label-column", "the label", "label"),
                                ("--image-column", "the image path (image lists)", "image")):
        note = "the column the model was trained with" if remembered else default
        parser.add_argument(flag, help=f"column holding {what} (default: {note})")


def _export(args: argparse.Namespace) -> int:
    from .artifacts import export_version
    from .gen_config import GENERATION_TASK
    from .metadata import read_meta

    if read_meta(args.model).task == GENERATION_TASK:  # its variants are fixed: the model and its proven ONNX form
        from .gen_artifacts import export_generation

        _print(export_generation(args.model, args.name).manifest.to_dict())
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    info = export_version(args.model, args.name, variants, args.validation, args.gate,
                          args.text_column, args.label_column, args.image_column)
    _print(info.manifest.to_dict())
    return 0


def _predict(args: argparse.Namespace) -> int:
    from . import registry
    from .gen_predict import GenerationPredictor, Sampling
    from .predict import ImagePredictor, load_predictor

    name, ref = registry.parse_ref(args.model)
    info = registry.resolve(name, ref)
    predictor = load_predictor(info, args.variant)
    if isinstance(predictor, GenerationPredictor):
        answers = predictor.generate(args.inputs, Sampling(max_new_tokens=args.max_new_tokens))
        _print({"model": info.ref, "variant": predictor.variant, "predictions": answers})
        return 0
    if isinstance(predictor, ImagePredictor):
        missing = [path for path in args.inputs if not Path(path).is_file()]
        if missing:
            raise DataError(f"predict: {info.ref} is an image model and takes image files; not files: {', '.join(missing)}")
    _print({"model": info.ref, "variant": predictor.variant, "predictions": predictor.predict(args.inputs, args.top_k)})
    return 0


def _models(args: argparse.Namespace) -> int:
    from . import registry

    if args.action == "list":
        _print(registry.list_models())
    elif args.action == "show":
        _print(registry.show(*registry.parse_ref(args.name)))
    elif args.action == "promote":
        info = registry.promote(args.name, args.version)
        _print({"name": info.name, "production": info.version})
    elif args.action == "rollback":
        info = registry.rollback(args.name)
        _print({"name": info.name, "production": info.version})
    elif args.action == "delete":
        registry.delete(args.name, args.version, force=args.force)
        _print({"name": args.name, "deleted": args.version})
    else:
        raise ConfigError(f"models: unknown action '{args.action}'; use list, show, promote, rollback or delete")
    return 0


def _print(value) -> None:
    print(json.dumps(value, indent=2))
