"""Flow ``demo``: what `make run` runs: a generated dataset through the pipeline, end to end."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from tasks.backbones import BackboneSpec, imagenet_weights_available
from tasks.synthetic import CLASSES, make_dataset

from .extract_features import extract_features
from .predict import predict
from .sweep import sweep
from .train_linear import train_linear

DEMO_BACKBONE = dict(backbone="mobilenet", backbone_args={"alpha": 0.25}, input_size=224,
                     layers=["conv_pw_13_relu", "conv_pw_7_relu"])


@task(name="generate-demo-dataset")
def generate_demo_dataset(root: str, images_per_class: int) -> str:
    if not Path(root).exists():
        make_dataset(root, CLASSES[:4], per_class=images_per_class, size=(160, 200), seed=7)
    return str(Path(root).resolve())


@task(name="check-imagenet-weights")
def check_imagenet_weights() -> bool:
    spec = BackboneSpec(DEMO_BACKBONE["backbone"], "imagenet", DEMO_BACKBONE["input_size"],
                        dict(DEMO_BACKBONE["backbone_args"]))
    return imagenet_weights_available(spec)


@flow(name="demo", log_prints=True)
def demo(out: str = "cnncodes-out", images_per_class: int = 40) -> dict:
    """Generate a 4-class texture dataset, extract its CNN codes at two layers (MobileNet 0.25, ImageNet
    weights when Keras can load them, random weights otherwise), sweep the layers, train a linear
    probe on the best one, and predict a folder of images with it."""
    data = generate_demo_dataset(str(Path(out) / "demo-data"), images_per_class)
    weights = "imagenet" if check_imagenet_weights() else "none"
    if weights == "none":
        print("ImageNet weights of MobileNet 0.25 are neither in Keras's cache (KERAS_HOME) nor downloadable; "
              "the demo goes on with random weights.")
    summary = extract_features(data, weights=weights, out=out, **DEMO_BACKBONE)
    swept = sweep(summary["store"], out=out)
    best = swept["best"]
    trained = train_linear(summary["store"], best["layer"], best["pooling"], classifier="softmax",
                           model_name="demo-textures", out=out, registry=str(Path(out) / "registry"))
    predicted = predict(str(Path(data) / "stripes"), "demo-textures", registry=str(Path(out) / "registry"),
                        output=str(Path(out) / "predictions" / "demo-stripes.csv"))
    return {"dataset": data, "extract": summary, "sweep": swept, "train": trained, "predict": predicted}
