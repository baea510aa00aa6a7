"""AdaBN: BatchNormalization statistics re-estimated on a group of inputs (tasks/finetune/adapt.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.finetune.adapt import (SelfTraining, adapt_batchnorm, batchnorm_layers, chunks, networks, predict_adapted,
                                  pseudo_labels, statistics)


def _model(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(5, 3, padding="valid", name="inner_conv")(inner_in)
    h = keras.layers.BatchNormalization(name="inner_bn")(h)
    inner = keras.Model(inner_in, keras.layers.ReLU()(h), name="inner")
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="valid", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = inner(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for bn in batchnorm_layers(model):  # trained statistics that are not those of any input below
        bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=bn.moving_variance.shape).astype("float32"))
    return model


def _inputs_of(model, layer, images):
    import keras

    return np.asarray(keras.Model(model.input, layer.input)(images, training=False), dtype=np.float64)


def _moments(x):
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes), x.var(axis=axes)


def test_every_batchnorm_layer_nested_ones_too_is_found_once():
    assert [la.name for la in batchnorm_layers(_model())] == ["bn", "inner_bn"]


@pytest.mark.parametrize("batch", [40, 7])
def test_adapted_statistics_are_those_of_each_layers_inputs_over_the_group(batch):
    import keras

    model = _model()
    images = np.random.default_rng(1).normal(2.0, 3.0, size=(40, 8, 8, 3)).astype("float32")
    assert adapt_batchnorm(model, chunks(images, batch)) == 40
    bn, inner_bn = batchnorm_layers(model)
    mean, var = _moments(_inputs_of(model, bn, images))
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4, atol=1e-4)
    # the nested layer's inputs depend on the first layer's statistics: exact when one batch holds the group
    inner = model.get_layer("inner")
    x = np.asarray(keras.Model(model.input, model.get_layer("relu").output)(images, training=False))
    mean, var = _moments(np.asarray(keras.Model(inner.input, inner_bn.input)(x), dtype=np.float64))
    tol = 1e-4 if batch >= len(images) else 0.1
    np.testing.assert_allclose(inner_bn.moving_mean.numpy(), mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(inner_bn.moving_variance.numpy(), var, rtol=tol, atol=tol)
    assert all("call" not in la.__dict__ for la in (bn, inner_bn))  # the layers' own call is back


def test_a_group_recorded_louder_and_offset_predicts_as_the_original_after_adaptation():
    model = _model()
    rng = np.random.default_rng(2)
    a = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    b = 2.5 * a + 0.7  # the same scenes through another channel: a gain and an offset
    images, groups = np.concatenate([a, b]), ["a"] * 32 + ["b"] * 32
    trained = statistics(batchnorm_layers(model))
    plain = model.predict(images, verbose=0)
    assert np.abs(plain[:32] - plain[32:]).max() > 1e-2  # unadapted, the channel changes the predictions
    probs, summary = predict_adapted(model, images, groups)
    np.testing.assert_allclose(probs[:32], probs[32:], atol=1e-4)
    assert summary["adapted_groups"] == {"a": 32, "b": 32} and summary["kept_groups"] == {}
    for (m0, v0), (m1, v1) in zip(trained, statistics(batchnorm_layers(model))):  # trained statistics back
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)


def test_a_group_smaller_than_the_minimum_keeps_the_trained_statistics():
    model = _model()
    rng = np.random.default_rng(3)
    images = rng.normal(size=(20, 8, 8, 3)).astype("float32")
    groups = ["big"] * 17 + ["small"] * 3
    plain = model.predict(images, verbose=0)
    probs, summary = predict_adapted(model, images, groups, min_images=16)
    np.testing.assert_allclose(probs[17:], plain[17:], atol=1e-6)
    assert np.abs(probs[:17] - plain[:17]).max() > 1e-3
    assert summary["kept_groups"] == {"small": 3} and summary["adapted_groups"] == {"big": 17}
    with pytest.raises(ValueError, match="group names"):
        predict_adapted(model, images, groups[:5])


def test_a_model_without_batchnorm_predicts_as_before():
    import keras

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(inp))
    x = np.random.default_rng(4).normal(size=(20, 4)).astype("float32")
    assert adapt_batchnorm(model, chunks(x)) == 0
    probs, summary = predict_adapted(model, x, ["g"] * 20)
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-6)
    assert summary["batchnorm_layers"] == 0


def test_a_batchnorm_layer_frozen_in_training_keeps_its_statistics_and_the_setting_needs_trained_ones(tmp_path):
    """A frozen layer holds pretrained statistics the layers after it learnt against: it is not adapted, also
    after the model is saved and loaded; and --adapt-batchnorm with BatchNormalization frozen is refused."""
    import keras

    from storage.errors import ParameterError
    from tasks.finetune import FineTuneConfig

    model = _model()
    model.get_layer("bn").trainable = False
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [la.name for la in batchnorm_layers(loaded)] == ["inner_bn"]
    assert [la.name for la in batchnorm_layers(loaded, learnt=False)] == ["bn", "inner_bn"]
    frozen = loaded.get_layer("bn")
    before = frozen.moving_mean.numpy().copy()
    images = np.random.default_rng(5).normal(3.0, 2.0, size=(20, 8, 8, 3)).astype("float32")
    adapt_batchnorm(loaded, chunks(images))
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), before)
    with pytest.raises(ParameterError, match="--train-batchnorm"):
        FineTuneConfig(adapt_batchnorm=True)
    assert FineTuneConfig(adapt_batchnorm=True, freeze_batchnorm=False).adapt_batchnorm


def test_pseudo_labels_are_the_most_confident_share_of_each_predicted_class():
    conf0 = [0.9, 0.5, 0.8, 0.6, 0.95, 0.7]  # rows 0-5 predicted class 0
    conf1 = [0.55, 0.99, 0.6, 0.7]  # rows 6-9 predicted class 1; class 2 never predicted
    probs = np.zeros((10, 3))
    for i, c in enumerate(conf0):
        probs[i] = [c, 1 - c, 0.0]
    for i, c in enumerate(conf1, 6):
        probs[i] = [0.0, c, 1 - c]
    idx, labels = pseudo_labels(probs, 0.5)
    assert idx.tolist() == [0, 2, 4, 7, 9] and labels.tolist() == [0, 0, 0, 1, 1]
    idx, labels = pseudo_labels(probs, 0.01)  # at least one of each class predicted
    assert idx.tolist() == [4, 7] and labels.tolist() == [0, 1]
    assert pseudo_labels(probs, 1.0)[0].tolist() == list(range(10))


def _entropy(p):
    return float(np.mean(-np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=1)))


def test_self_training_sharpens_each_group_on_its_own_predictions_and_the_trained_weights_come_back():
    model = _model()
    rng = np.random.default_rng(6)
    a = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    images = np.concatenate([a, 2.0 * rng.normal(size=(32, 8, 8, 3)).astype("float32") + 1.0,
                             rng.normal(size=(5, 8, 8, 3)).astype("float32")])
    groups = ["a"] * 32 + ["b"] * 32 + ["few"] * 5
    weights = model.get_weights()
    adabn, _ = predict_adapted(model, images, groups)
    told = []
    how = SelfTraining(rounds=2, epochs=5, fractions=(0.5, 0.75), learning_rate=1e-2, batch_size=8, seed=3,
                       progress=lambda done, total: told.append((done, total)))
    probs, summary = predict_adapted(model, images, groups, self_training=how)
    assert told == [(i, 20) for i in range(1, 21)]  # 2 groups x 2 rounds x 1 network x 5 epochs
    for part in (slice(0, 32), slice(32, 64)):  # it learnt its own confident predictions: surer of each group
        assert _entropy(probs[part]) < _entropy(adabn[part]) - 0.05
    np.testing.assert_allclose(probs[64:], adabn[64:], atol=1e-6)  # too few to adapt: neither adapted nor trained
    st = summary["self_training"]
    assert set(st["groups"]) == {"a", "b"} and st["rounds"] == 2 and st["epochs"] == 5
    for g in ("a", "b"):
        rounds = st["groups"][g]["rounds"]
        assert len(rounds) == 2 and 12 <= rounds[0]["pseudo_labels"] <= 19 and 21 <= rounds[1]["pseudo_labels"] <= 27
    for w0, w1 in zip(weights, model.get_weights()):  # every weight and statistic as trained
        np.testing.assert_array_equal(w0, w1)
    again, _ = predict_adapted(model, images, groups)
    np.testing.assert_allclose(again, adabn, atol=1e-6)


def test_the_networks_of_an_ensemble_train_one_by_one_on_its_own_weights():
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(0.5)(inp)
    outs = []
    for k in (1, 2):
        sub_in = keras.Input((8, 8, 3))
        h = keras.layers.GlobalAveragePooling2D()(keras.layers.BatchNormalization()(sub_in))
        outs.append(keras.Model(sub_in, keras.layers.Dense(3, activation="softmax")(h), name=f"network_{k}")(x))
    ens = keras.Model(inp, keras.layers.Average(name="ensemble_average")(outs), name="cnncodes_ensemble")
    nets = networks(ens)
    assert len(nets) == 2
    for k, net in enumerate(nets, 1):
        own = ens.get_layer(f"network_{k}").trainable_weights
        assert len(net.trainable_weights) == len(own) and all(a is b for a, b in zip(net.trainable_weights, own))
    assert networks(_model())[0].name != "cnncodes_ensemble" and len(networks(_model())) == 1


def test_self_training_settings_are_checked():
    from storage.errors import ParameterError
    from tasks.finetune import FineTuneConfig

    with pytest.raises(ParameterError, match="--adapt-batchnorm"):
        FineTuneConfig(self_train=1, freeze_batchnorm=False)
    ok = dict(adapt_batchnorm=True, freeze_batchnorm=False)
    for bad in ({"self_train": -1}, {"self_train": 1, "self_train_fraction": 0.0},
                {"self_train": 1, "self_train_fraction": (0.5, 1.5)}, {"self_train": 1, "self_train_fraction": ()},
                {"self_train": 1, "self_train_epochs": 0},
                {"self_train": 1, "self_train_learning_rate": 0.0}):
        with pytest.raises(ParameterError, match=next(iter(bad if len(bad) == 1 else list(bad)[1:]))):
            FineTuneConfig(**ok, **bad)
    assert FineTuneConfig(**ok, self_train=2).self_train == 2
