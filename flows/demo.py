"""Flow ``demo``: what `make run` runs: a generated dataset through the pipeline, end to end."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, task

from tasks.backbones import BackboneSpec, imagenet_weights_available
from tasks.results import DemoResult
from tasks.settings import Output
from tasks.data.synthetic import CLASSES, make_dataset
from tasks.runtime import use_backend

from flows.predict import predict
from flows.transfer import transfer

DEMO_BACKBONE = BackboneSpec(name="mobilenet", backbone_args={"alpha": 0.25}, input_size=224, weights="imagenet")

@task(name="generate-demo-dataset")
def generate_demo_dataset(root: str, images_per_class: int) -> str:
    if not Path(root).exists():
        make_dataset(root, CLASSES[:4], per_class=images_per_class, size=(160, 200), seed=7)
    return str(Path(root).resolve())


@task(name="check-imagenet-weights")
def check_imagenet_weights() -> bool:
    return imagenet_weights_available(DEMO_BACKBONE)


@flow(name="demo", log_prints=True)
def demo(out: str = "cnncodes-out", images_per_class: int = 40,
         backend: Literal["tensorflow", "jax", "torch"] | None = None) -> DemoResult:
    """Generate a 4-class texture dataset, run the `transfer` flow on it (MobileNet 0.25: ImageNet weights
    when Keras can load them, random weights otherwise), then predict a folder of images with the champion.
    ``backend``: the Keras backend to compute on (default: KERAS_BACKEND, else keras.json's, else tensorflow)."""
    use_backend(backend)  # Keras's backend for this process: before anything imports Keras
    data = generate_demo_dataset(str(Path(out) / "demo-data"), images_per_class)
    weights = "imagenet" if check_imagenet_weights() else "none"
    if weights == "none":
        print("ImageNet weights of MobileNet 0.25 are neither in Keras's cache (KERAS_HOME) nor downloadable; "
              "the demo goes on with random weights.")
    output = Output(out=out, backend=backend)
    result = transfer(data, DEMO_BACKBONE.model_copy(update={"weights": weights}), model_name="demo-textures",
                      output=output)
    champion = result.champion
    predicted = predict(str(Path(data) / "stripes"), champion["name"], version="champion", output=output,
                        predictions=str(Path(out) / "predictions" / "demo-stripes.csv"))
    return DemoResult(dataset=data, transfer=result, predict=predicted)
