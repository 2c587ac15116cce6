"""`mmkd predict`, `mmkd embed`: ask the trained student (mmkd.serving)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmkd.cli.common import ParamsOpt, RootOpt, app
from mmkd.config import ConfigError

# --- inference for users (mmkd.serving): `mmkd predict`, `mmkd embed` ---
ModelOpt = typer.Option("models:/mmkd-student@champion", "--model",
                        help="MLflow model URI (models:/name@alias, models:/name/3, runs:/<id>/student) or a local "
                             "checkpoint / model folder")
TrackingOpt = typer.Option(None, "--tracking-uri",
                           help="MLflow tracking server or store (default: MLFLOW_TRACKING_URI, else params.yaml's "
                                "tracking.tracking_uri, else ROOT/mlflow_server/mlflow.db)")
DeviceOpt = typer.Option("auto", "--device", help="auto|cpu|cuda[:N]")


def _inference_model(model: str, tracking_uri: Optional[str], root: Path, params: Optional[Path], device: str):
    from mmkd.serving.model import ModelError, load_model, resolve_tracking_uri

    try:
        uri = None if Path(model).is_dir() else resolve_tracking_uri(root, tracking_uri, params)
        return load_model(model, uri, device)
    except (ModelError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def _serving_limits(root: Path, params: Optional[Path]):
    """params.yaml's `serving` limits (defaults when there is no params.yaml): the CLI reads as the server does."""
    from mmkd.config import ServingCfg, load_params

    path = Path(params) if params else Path(root) / "params.yaml"
    try:
        return load_params(path).serving if path.exists() else ServingCfg()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def _read_images(inputs: list[str], root: Path, params: Optional[Path]):
    from mmkd.serving.inputs import read_all

    images, skipped = read_all(inputs, limits=_serving_limits(root, params))
    for s in skipped:
        typer.echo(f"skipped {s.input}: {s.reason}", err=True)
    if not images:
        typer.echo(f"error: none of the {len(inputs)} input(s) could be read", err=True)
        raise typer.Exit(1)
    return images, skipped


@app.command("predict")
def predict(images: list[str] = typer.Argument(..., help="image files or folders (searched recursively): PNG, JPEG, "
                                                         "TIFF, BMP, WebP (16-bit too), DICOM, NIfTI"),
            labels: str = typer.Option(..., "--labels",
                                       help='comma-separated labels, e.g. "pneumonia,normal,effusion"'),
            model: str = ModelOpt, tracking_uri: Optional[str] = TrackingOpt,
            templates: Optional[list[str]] = typer.Option(None, "--template", "--templates", "-t",
                                                          help="prompt template with {label}; repeat for an ensemble "
                                                               "(default: five generic medical templates)"),
            top_k: Optional[int] = typer.Option(None, "--top-k", min=1,
                                                help="show the k most probable labels per image"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
            device: str = DeviceOpt, root: Path = RootOpt, params: Optional[Path] = ParamsOpt):
    """Zero-shot classification: each image against prompt ensembles of the labels; a probability table."""
    from mmkd.serving import predict as zs

    try:
        names = zs.parse_labels(labels)
        chosen = tuple(templates) if templates else zs.DEFAULT_TEMPLATES
        [zs.prompts(n, chosen) for n in names]  # a template without {label}: fail before loading anything
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    read, skipped = _read_images(images, root, params)
    loaded = _inference_model(model, tracking_uri, root, params, device)
    probs = zs.predict(loaded, [rgb for _, rgb in read], names, chosen)
    records = zs.as_records([str(p) for p, _ in read], names, probs, top_k)
    if as_json:
        typer.echo(json.dumps({"model": loaded.uri, "version": loaded.version, "labels": names,
                               "templates": list(chosen), "logit_scale": loaded.logit_scale, "predictions": records,
                               "skipped": [{"input": s.input, "reason": s.reason} for s in skipped]}, indent=1))
        return
    typer.echo(f"model {loaded.describe()}; {len(chosen)} prompt(s) per label"
               + ("" if top_k else "; * = most probable"), err=True)
    typer.echo(zs.table(records, names, top_k))


@app.command("embed")
def embed(inputs: list[str] = typer.Argument(..., help="image files or folders; with --texts: captions or @file.txt "
                                                       "(one caption per line)"),
          out: Path = typer.Option(..., "--out", "-o", help="X.npy: float32 unit embeddings, one row per input; "
                                                            "X.index.json says which input each row is"),
          texts: bool = typer.Option(False, "--texts", help="embed captions instead of images"),
          model: str = ModelOpt, tracking_uri: Optional[str] = TrackingOpt,
          device: str = DeviceOpt, root: Path = RootOpt, params: Optional[Path] = ParamsOpt):
    """Images or captions -> unit-norm embeddings of the student (.npy) and an index of the rows."""
    from mmkd.serving import embed as em

    if texts:
        try:
            rows, skipped = em.read_texts(inputs), []
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
    else:
        read, skipped = _read_images(inputs, root, params)
        rows = [str(p) for p, _ in read]
    loaded = _inference_model(model, tracking_uri, root, params, device)
    emb = em.embed_texts(loaded, rows) if texts else em.embed_images(loaded, [rgb for _, rgb in read])
    npy, index = em.write(out, emb, rows, "text" if texts else "image", loaded, skipped)
    typer.echo(f"wrote {npy} ({emb.shape[0]} x {emb.shape[1]} float32, unit norm; model {loaded.describe()}) "
               f"and {index}")
