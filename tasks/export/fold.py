"""A linear probe's scikit-learn pipeline folded into a few exact maps (NumPy, no TensorFlow).

Every step the project trains is affine or an L2 normalisation:

* ``StandardScaler``: ``(x - mean) / scale``; ``PCA``: ``(x - mean) @ components.T`` (whitened: divided
  by ``sqrt(explained_variance)``); ``LogisticRegression`` / ``LinearSVC`` / ``SGDClassifier``:
  ``x @ coef.T + intercept``. Consecutive affine maps compose into one, in float64;
* ``Normalizer`` (L2): ``x / ||x||``, Keras's ``UnitNormalization``.

The probabilities on top:

* multinomial logistic regression: ``softmax(z)``;
* binary logistic regression and SGD (log loss): ``sigmoid(z)``, one-vs-rest normalised for several
  classes, ``p_c = sigmoid(z_c) / sum_j sigmoid(z_j)``;
* ``CalibratedClassifierCV(method="sigmoid")`` over a LinearSVC: per cross-validation fold its own
  pipeline and, per class, ``sigmoid(-(a * d + b))`` of the fold's decision ``d``, normalised as above
  (binary: ``[1 - p, p]``), then averaged over the folds;
* an uncalibrated LinearSVC has no probabilities: its decision scores (``[-d, d]`` when binary), the
  columns ``cnncodes predict`` writes for it.

Normalised sigmoids are a softmax of log-sigmoids: ``sigmoid(z_c) / sum_j sigmoid(z_j) =
softmax(log sigmoid(z))_c`` and ``log sigmoid(z) = -softplus(-z)``, so they are standard layers too
(the binary ``[1 - sigmoid(z), sigmoid(z)]`` is the same with logits ``[z, -z]`` negated and
softplussed). :func:`fold_pipeline` returns a :class:`Head`: per branch (one per calibration fold) a
list of steps, and how the branches' outputs become class scores. Anything else (isotonic
calibration, a step of another kind) is refused with a message that says what to do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.errors import CnncodesError

# How the outputs of the branches become class scores (see the module's doc).
OUTPUTS = ("softmax", "sigmoids", "scores")


class ExportError(CnncodesError):
    """A model cannot be exported as asked; the message says why and what to do."""


@dataclass
class Affine:
    """``x @ kernel + bias`` (float64, composed exactly; cast to float32 in the layer)."""

    kernel: np.ndarray
    bias: np.ndarray

    def then(self, other: "Affine") -> "Affine":
        return Affine(self.kernel @ other.kernel, self.bias @ other.kernel + other.bias)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.kernel + self.bias


@dataclass
class L2:
    """``x / ||x||_2`` per row (rows of zeros stay zeros)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n == 0, 1.0, n)


@dataclass
class Head:
    """The probe as maps: ``branches`` (each a list of Affine/L2 steps from the pooled codes to its
    logits), combined by ``output`` into one score per entry of ``classes`` (the classifier's
    ``classes_``: label indices into the model's class names)."""

    branches: list[list[Any]]
    output: str
    classes: list[int]
    n_features: int
    description: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        """Logits per branch."""
        last = [s for s in self.branches[0] if isinstance(s, Affine)][-1]
        return int(last.kernel.shape[1])

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """The scores in float64 NumPy (what the Keras layers compute in float32)."""
        outs = []
        for steps in self.branches:
            x = np.asarray(X, np.float64)
            for s in steps:
                x = s(x)
            outs.append(x)
        if self.output == "scores":
            return outs[0]
        if self.output == "softmax":
            return _softmax(outs[0])
        logs = [-np.logaddexp(0.0, o) for o in outs]  # -softplus(v)
        return np.mean([_softmax(v) for v in logs], axis=0)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _name(obj: Any) -> str:
    return type(obj).__name__


def _steps_of(pipeline: Any) -> list[tuple[str, Any]]:
    steps = getattr(pipeline, "steps", None)
    if steps is None:
        return [("clf", pipeline)]
    return list(steps)


def _affine_of(step: Any, n: int) -> Affine | L2:
    kind = _name(step)
    if kind == "StandardScaler":
        mean = np.zeros(n) if getattr(step, "mean_", None) is None else np.asarray(step.mean_, np.float64)
        scale = np.ones(n) if getattr(step, "scale_", None) is None else np.asarray(step.scale_, np.float64)
        return Affine(np.diag(1.0 / scale), -mean / scale)
    if kind == "PCA":
        comps = np.asarray(step.components_, np.float64)  # (k, n)
        kernel = comps.T.copy()
        if getattr(step, "whiten", False):
            kernel /= np.sqrt(np.asarray(step.explained_variance_, np.float64))
        mean = np.asarray(step.mean_, np.float64)
        return Affine(kernel, -mean @ kernel)
    if kind == "Normalizer":
        if step.norm != "l2":
            raise ExportError(f"a Normalizer with norm {step.norm!r} has no exact layer form; only the L2 norm "
                              "(cnncodes' --l2-normalize) is exported. Retrain with the L2 norm.")
        return L2()
    if kind in ("LogisticRegression", "LinearSVC", "SGDClassifier"):
        coef = np.asarray(step.coef_, np.float64)
        intercept = np.broadcast_to(np.asarray(step.intercept_, np.float64), (coef.shape[0],))
        return Affine(coef.T.copy(), intercept.copy())
    raise ExportError(f"the pipeline step {kind} has no exact layer form; export knows StandardScaler, "
                      "Normalizer (L2), PCA, LogisticRegression, LinearSVC, SGDClassifier (log loss) and "
                      "CalibratedClassifierCV (sigmoid). Retrain the probe with `cnncodes train-linear`.")


def _chain(pipeline: Any, n_features: int) -> tuple[list[Any], Any]:
    """The pipeline as composed steps (consecutive affine maps in one), and its final classifier."""
    steps = _steps_of(pipeline)
    out: list[Any] = []
    n = n_features
    for _, step in steps:
        if step is None or step == "passthrough":
            continue
        m = _affine_of(step, n)
        if isinstance(m, Affine):
            if m.kernel.shape[0] != n:
                raise ExportError(f"step {_name(step)} takes {m.kernel.shape[0]} features where {n} arrive: the "
                                  "pipeline does not fit the codes it is exported with.")
            n = m.kernel.shape[1]
            if out and isinstance(out[-1], Affine):
                out[-1] = out[-1].then(m)
                continue
        out.append(m)
    clf = steps[-1][1]
    return out, clf


def _classifier_kind(clf: Any) -> str:
    kind = _name(clf)
    if kind == "SGDClassifier" and getattr(clf, "loss", None) not in ("log_loss", "log"):
        raise ExportError(f"an SGDClassifier with loss {clf.loss!r} has no probabilities to export; the project "
                          "trains SGD with the log loss. Retrain with `--classifier sgd`.")
    if kind not in ("LogisticRegression", "LinearSVC", "SGDClassifier"):
        raise ExportError(f"the classifier {kind} cannot be exported (known: LogisticRegression, LinearSVC, "
                          "SGDClassifier, each optionally in a sigmoid CalibratedClassifierCV).")
    return kind


def _with_logits(steps: list[Any], final: Affine) -> list[Any]:
    """``steps`` whose last affine map is replaced by ``final`` composed after it."""
    steps = list(steps)
    steps[-1] = steps[-1].then(final)
    return steps


def _sigmoid_logits(steps: list[Any]) -> list[Any]:
    """Branch logits ``v`` whose ``-softplus(v)`` are the log-probabilities of normalised sigmoids of the
    decision ``z``: ``v = -z`` per class, or ``[z, -z]`` for a binary decision of one column."""
    k = steps[-1].kernel.shape[1]
    if k == 1:
        return _with_logits(steps, Affine(np.array([[1.0, -1.0]]), np.zeros(2)))
    return _with_logits(steps, Affine(-np.eye(k), np.zeros(k)))


def fold_pipeline(model: Any, n_features: int) -> Head:
    """Fold a registered probe (a Pipeline, or a sigmoid CalibratedClassifierCV over one) into a
    :class:`Head`. Raises ExportError for what has no exact form."""
    if _name(model) == "CalibratedClassifierCV":
        return _fold_calibrated(model, n_features)
    steps, clf = _chain(model, n_features)
    kind = _classifier_kind(clf)
    classes = [int(c) for c in clf.classes_]
    if not steps or not isinstance(steps[-1], Affine):
        raise ExportError("the pipeline ends in a normalisation, not a linear classifier: nothing to export.")
    binary = steps[-1].kernel.shape[1] == 1
    if kind == "LinearSVC":
        out = _with_logits(steps, Affine(np.array([[-1.0, 1.0]]), np.zeros(2))) if binary else steps
        return Head([out], "scores", classes, n_features, ["LinearSVC decision scores (no calibration: not "
                                                           "probabilities)"])
    if kind == "LogisticRegression" and not binary:
        return Head([steps], "softmax", classes, n_features, ["multinomial logistic regression: softmax"])
    what = "binary logistic regression: sigmoid" if kind == "LogisticRegression" else \
        f"SGD (log loss): {'sigmoid' if binary else 'one-vs-rest sigmoids, normalised'}"
    return Head([_sigmoid_logits(steps)], "sigmoids", classes, n_features, [what])


def _fold_calibrated(model: Any, n_features: int) -> Head:
    method = getattr(model, "method", None)
    if method != "sigmoid":
        hint = (" Isotonic calibration is a step function of the decision, which has no exact form in "
                "standard Keras layers." if method == "isotonic" else "")
        raise ExportError(f"probability calibration {method!r} cannot be exported; only 'sigmoid' (Platt) "
                          f"calibration folds exactly into layers.{hint} Retrain the probe with sigmoid "
                          "calibration (cnncodes' SVM default), then export it.")
    classes = [int(c) for c in model.classes_]
    branches = []
    for cal in model.calibrated_classifiers_:
        steps, clf = _chain(cal.estimator, n_features)
        kind = _classifier_kind(clf)
        if [int(c) for c in clf.classes_] != classes:
            raise ExportError(f"a calibration fold's {kind} saw classes {list(clf.classes_)} of {classes}: its "
                              "probabilities are not folded. Retrain with more images of each class.")
        if not steps or not isinstance(steps[-1], Affine):
            raise ExportError("a calibration fold's pipeline ends in a normalisation, not a classifier.")
        k = steps[-1].kernel.shape[1]
        if len(cal.calibrators) != k:
            raise ExportError(f"a calibration fold has {len(cal.calibrators)} calibrators for {k} decision "
                              "columns: not a model export knows.")
        a = np.array([float(c.a_) for c in cal.calibrators])
        b = np.array([float(c.b_) for c in cal.calibrators])
        # the calibrated probability of column j is sigmoid(z_j), z_j = -(a_j * d_j + b_j)
        steps = _with_logits(steps, Affine(np.diag(-a), -b))
        branches.append(_sigmoid_logits(steps))
    if not branches:
        raise ExportError("the calibrated classifier has no fitted folds.")
    return Head(branches, "sigmoids", classes, n_features,
                [f"LinearSVC with sigmoid calibration: {len(branches)} fold(s), each its own pipeline and "
                 "per-class sigmoid of the decision, normalised, averaged"])
