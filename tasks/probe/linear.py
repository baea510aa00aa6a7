"""Linear classifiers on CNN codes (cases 1 and 2 of transfer learning).

Every classifier is one scikit-learn ``Pipeline`` (standardisation, optional
L2 normalisation and PCA, then the classifier) so that the exact transform is
saved with the model. ``C`` (or ``alpha`` for SGD) is chosen by stratified
k-fold cross-validation, in parallel with joblib. The SGD variant trains
chunk by chunk from the store, for stores larger than memory.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from storage.errors import DatasetError, ParameterError

from ..settings import Settings

CLASSIFIERS = ("svm", "softmax", "sgd")
DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


class LinearConfig(Settings):
    """How a linear probe is trained. ``C`` left out searches ``c_grid`` by cross-validation."""

    classifier: Literal[CLASSIFIERS] = Field("softmax", description="linear SVM (calibrated), multinomial logistic "
                                                                    "regression, or SGD trained chunk by chunk for "
                                                                    "stores larger than memory")
    C: float | None = Field(None, description="inverse regularisation strength (default: chosen by stratified "
                                              "k-fold CV among c_grid)")
    c_grid: tuple[float, ...] = Field(DEFAULT_C_GRID, description="values of C the search compares")
    cv_folds: int = Field(5, description="folds of the C search")
    class_weight: Literal["balanced"] | None = Field(None, description="weight classes inversely to their "
                                                                       "frequency")
    l2_normalize: bool = Field(False, description="L2-normalise codes after standardisation")
    pca: float | int | None = Field(None, description="PCA before the classifier: components (>= 1) or share of "
                                                      "variance (< 1)")
    calibrate: bool = Field(True, description="SVM: calibrate probabilities (without, predictions carry none)")
    max_iter: int = Field(3000, description="solver iterations")
    n_jobs: int = Field(-1, description="processes of the C search (-1: every core); small data (under 2 million "
                                        "feature values) is searched in this process, faster than starting workers")
    seed: int = Field(0, description="seed of CV folds and solvers")
    sgd_epochs: int = Field(5, description="passes over the store for classifier sgd")
    chunk_rows: int = Field(8192, description="rows per chunk for classifier sgd")

    @model_validator(mode="before")
    @classmethod
    def _whole_pca(cls, data: Any) -> Any:
        # 64.0 components from a float option is 64 components; 0.95 stays a share of variance
        if isinstance(data, dict) and isinstance(data.get("pca"), float) and data["pca"] >= 1 \
                and float(data["pca"]).is_integer():
            data = {**data, "pca": int(data["pca"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> "LinearConfig":
        if self.C is not None and not (self.C > 0 and math.isfinite(self.C)):
            raise ParameterError(f"C must be a positive number (or left out to search {list(self.c_grid)}); "
                                 f"got {self.C!r}.")
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise ParameterError(f"c_grid must be positive numbers; got {list(self.c_grid)!r}.")
        if self.cv_folds < 2:
            raise ParameterError(f"cv_folds must be an integer of at least 2; got {self.cv_folds!r}.")
        if self.pca is not None:
            ok = (isinstance(self.pca, int) and self.pca >= 1) or (isinstance(self.pca, float) and 0 < self.pca < 1)
            if not ok:
                raise ParameterError(f"pca must be a number of components (integer >= 1) or a share of variance "
                                     f"in (0, 1); got {self.pca!r}.")
        if self.sgd_epochs < 1:
            raise ParameterError(f"sgd_epochs must be a positive integer; got {self.sgd_epochs!r}.")
        if self.chunk_rows < 16:
            raise ParameterError(f"chunk_rows must be an integer of at least 16; got {self.chunk_rows!r}.")
        return self


def check_labels(y: np.ndarray, class_names: Sequence[str], split: str = "train") -> None:
    """A classifier needs at least two classes with examples in ``split``."""
    present = np.unique(y)
    if len(present) < 2:
        only = class_names[int(present[0])] if len(present) else "none"
        raise DatasetError(f"the {split} split has images of {len(present)} class(es) (only: {only}); a classifier "
                           "needs at least two. Add images of other classes, or check the dataset layout.")


def _classifier(cfg: LinearConfig, C: float):
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.svm import LinearSVC

    if cfg.classifier == "softmax":
        return LogisticRegression(C=C, max_iter=cfg.max_iter, class_weight=cfg.class_weight,
                                  random_state=cfg.seed)
    if cfg.classifier == "svm":
        return LinearSVC(C=C, max_iter=cfg.max_iter, class_weight=cfg.class_weight, random_state=cfg.seed,
                         dual="auto")
    # SGD with logistic loss: probabilities, and partial_fit for out-of-core training.
    return SGDClassifier(loss="log_loss", alpha=1.0 / (C * 1000.0), class_weight=cfg.class_weight,
                         random_state=cfg.seed, max_iter=cfg.max_iter, tol=1e-4)


def build_pipeline(cfg: LinearConfig, C: float, n_features: int | None = None):
    """StandardScaler [+ Normalizer] [+ PCA] + the classifier, as one Pipeline."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps: list[tuple[str, Any]] = [("scale", StandardScaler())]
    if cfg.l2_normalize:
        steps.append(("l2", Normalizer()))
    if cfg.pca is not None:
        n = cfg.pca
        if isinstance(n, int) and n_features is not None:
            n = min(n, n_features)
        steps.append(("pca", PCA(n_components=n, random_state=cfg.seed)))
    steps.append(("clf", _classifier(cfg, C)))
    return Pipeline(steps)


def _cv_folds(y: np.ndarray, wanted: int) -> int:
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min()) if np.any(counts > 0) else 0
    return max(2, min(wanted, smallest))


@dataclass
class TrainResult:
    model: Any
    C: float
    cv_scores: list[dict[str, float]] = field(default_factory=list)   # [{C, mean, std}]
    seconds: float = 0.0


def train_linear(X: np.ndarray, y: np.ndarray, class_names: Sequence[str], cfg: LinearConfig,
                 groups: np.ndarray | None = None) -> TrainResult:
    """Fit the pipeline on ``(X, y)``, choosing C by stratified k-fold CV when ``cfg.C`` is None (grouped
    by ``groups`` when given: see :func:`cv_score`).

    Raises DatasetError for fewer than two classes or too few images to cross-validate."""
    check_labels(y, class_names)
    X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    t = time.perf_counter()
    grid = [float(cfg.C)] if cfg.C is not None else [float(c) for c in cfg.c_grid]
    scores: list[dict[str, float]] = []
    best_c = grid[0]
    if len(grid) > 1:
        counts = np.bincount(y)
        if counts[counts > 0].min() < 2:
            raise DatasetError("a class has a single training image, too few to cross-validate C; "
                               "add images, or give C explicitly (--C 0.1).")
        for c in grid:
            mean, std = cv_score(X, y, cfg, c, groups)
            scores.append({"C": c, "mean": mean, "std": std})
        best_c = max(scores, key=lambda r: (round(r["mean"], 6), -r["C"]))["C"]
    model = _final(cfg, best_c, X.shape[1], calibrate=cfg.calibrate, y=y)
    model.fit(X, y)
    return TrainResult(model=model, C=best_c, cv_scores=scores, seconds=time.perf_counter() - t)


# Below this many feature values a fold fits in milliseconds and starting worker processes (each
# importing scikit-learn) costs seconds more than it saves: the folds then run in this process.
PARALLEL_MIN_VALUES = 2_000_000


def cv_score(X: np.ndarray, y: np.ndarray, cfg: LinearConfig, C: float, groups: np.ndarray | None = None
             ) -> tuple[float, float]:
    """Mean and standard deviation of the balanced accuracy of ``cfg``'s pipeline at ``C`` over
    stratified folds (seeded: the same folds for every C and every layer), in parallel with joblib.

    With ``groups`` (one per row: a speaker, a patient) of at least two distinct values, the folds are
    grouped as well (``StratifiedGroupKFold``, as many folds as groups at most): every score is then
    measured on groups the fold's model never saw, as the test split is. Without grouping, recordings of
    one speaker on both sides of a fold reward what identifies the speaker."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score

    n_groups = len(np.unique(groups)) if groups is not None else 0
    if n_groups >= 2:
        cv = StratifiedGroupKFold(n_splits=min(n_groups, max(2, cfg.cv_folds)), shuffle=True, random_state=cfg.seed)
    else:
        cv = StratifiedKFold(n_splits=_cv_folds(y, cfg.cv_folds), shuffle=True, random_state=cfg.seed)
        groups = None
    s = cross_val_score(_final(cfg, C, X.shape[1], calibrate=False), X, y, groups=groups, cv=cv,
                        scoring="balanced_accuracy", n_jobs=cfg.n_jobs if X.size >= PARALLEL_MIN_VALUES else 1)
    return float(s.mean()), float(s.std())


def _final(cfg: LinearConfig, C: float, n_features: int, calibrate: bool, y: np.ndarray | None = None):
    pipe = build_pipeline(cfg, C, n_features)
    if cfg.classifier == "svm" and calibrate:
        from sklearn.calibration import CalibratedClassifierCV

        counts = np.bincount(y) if y is not None else np.array([3])
        folds = max(2, min(3, int(counts[counts > 0].min())))
        return CalibratedClassifierCV(pipe, method="sigmoid", cv=folds)
    return pipe


def train_sgd_chunked(chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], classes: Sequence[int],
                      cfg: LinearConfig, progress: Callable[[int, int], None] | None = None,
                      epoch_chunks: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]] | None = None
                      ) -> TrainResult:
    """Out-of-core training: one pass over ``chunks()`` fits the scaler, then ``cfg.sgd_epochs``
    passes of ``partial_fit``, over ``epoch_chunks(epoch)`` (epoch 0, 1, ...) when given, else over
    ``chunks()``. Each call yields ``(X, y)`` for one pass over the rows; only one chunk is in memory at
    a time. PCA is not available here (it needs all rows).

    SGD forgets: chunks that each hold one class (a store sorted by class, read in order) leave a model
    far from the optimum. The rows within a chunk are shuffled here, but mixing classes across chunks is
    the caller's: ``epoch_chunks`` should give each epoch's chunks in a mixed order (``fit_probe`` uses the
    store's block shuffle, ``iter_chunks(..., shuffle_seed=...)``)."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if cfg.pca is not None:
        raise ParameterError("pca is not available with chunked SGD training (it needs every row in memory); "
                             "leave pca out, or use classifier softmax/svm on a store that fits in memory.")
    t = time.perf_counter()
    C = float(cfg.C) if cfg.C is not None else 1.0
    scaler = StandardScaler()
    rows = 0
    for X, _ in chunks():
        scaler.partial_fit(X.reshape(len(X), -1))
        rows += len(X)
    norm = Normalizer() if cfg.l2_normalize else None
    # Suffix averaging: the model is the average of the iterates of the last half of the epochs. Averaged
    # from the first update, it kept the early, far-off iterates and varied by several points of accuracy
    # from one seed to the next, even on well-mixed chunks.
    burn_in = rows * (cfg.sgd_epochs // 2)
    clf = SGDClassifier(loss="log_loss", alpha=1.0 / (C * 1000.0), random_state=cfg.seed,
                        learning_rate="optimal", average=burn_in if burn_in > 1 else True)
    classes = np.asarray(sorted(classes))
    weights = None
    if cfg.class_weight == "balanced":
        counts = np.zeros(len(classes))
        for _, y in chunks():
            counts += np.array([(y == c).sum() for c in classes])
        weights = {int(c): counts.sum() / (len(classes) * max(n, 1)) for c, n in zip(classes, counts)}
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(cfg.sgd_epochs):
        for X, y in (chunks() if epoch_chunks is None else epoch_chunks(epoch)):
            X = scaler.transform(X.reshape(len(X), -1))
            if norm is not None:
                X = norm.transform(X)
            order = rng.permutation(len(y))
            sw = None if weights is None else np.array([weights[int(v)] for v in y[order]])
            clf.partial_fit(X[order], y[order], classes=classes, sample_weight=sw)
        if progress:
            progress(epoch + 1, cfg.sgd_epochs)
    steps = [("scale", scaler)] + ([("l2", norm)] if norm is not None else []) + [("clf", clf)]
    return TrainResult(model=Pipeline(steps), C=C, seconds=time.perf_counter() - t)


# The layer sweep's probe: one fixed C for every layer (a search per layer would compare searches,
# not layers), no calibration (the sweep only scores).
SWEEP_PROBE = LinearConfig(C=0.1, calibrate=False)
