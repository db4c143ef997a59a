"""PruningConfig: validated once, at construction, with errors that name the argument; resolved from the training
length."""

import pytest

from lightning_compress.engine.config import PruningConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "quadratic"}, r"`schedule` must be one of 'cubic', .* got 'quadratic'"),
        ({"target_sparsity": 1.0}, r"`target_sparsity` must be in \[0, 1\), got 1.0"),
        ({"target_sparsity": -0.1}, r"`target_sparsity` must be in \[0, 1\), got -0.1"),
        ({"initial_sparsity": 0.95}, r"`initial_sparsity` must be <= `target_sparsity` \(0.9\), got 0.95"),
        ({"start_step": 10, "end_step": 10}, r"`end_step` must be greater than `start_step` \(10\), got 10"),
        ({"start_step": -1}, r"`start_step` must be a non-negative integer, got -1"),
        ({"update_every_n_steps": 0}, r"`update_every_n_steps` must be a positive integer, got 0"),
        ({"scope": "layer"}, r"`scope` must be one of 'global', 'local', got 'layer'"),
        (
            {"structure": "filter"},
            r"`structure` must be one of 'unstructured', 'channel' or an 'N:M' pattern such as '2:4', got 'filter'",
        ),
        ({"criterion": "l1"}, r"`criterion` must be one of 'magnitude', 'random', got 'l1'"),
        ({"end_fraction": 0.0}, r"`end_fraction` must be in \(0, 1\], got 0.0"),
        ({"rewind_to_step": 5}, r"`rewind_to_step` must be <= `start_step` \(0\)"),
        ({"seed": "abc"}, r"`seed` must be a non-negative integer, got 'abc'"),
        ({"include": "fc1"}, r"`include` must be a list of regular expressions"),
        ({"exclude": ["("]}, r"`exclude` has an invalid regular expression"),
    ],
)
def test_bad_values_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_resolve_derives_end_step_and_frequency():
    config = PruningConfig(start_step=10, end_fraction=0.5).resolve(total_steps=210)
    assert (config.end_step, config.update_every_n_steps) == (110, 1)
    assert PruningConfig(end_step=500).resolve(None).update_every_n_steps == 5  # about 100 updates
    given = PruningConfig(end_step=50, update_every_n_steps=7)
    assert given.resolve(None) == given


def test_resolve_needs_a_finite_length():
    with pytest.raises(ValueError, match=r"`end_step`=None needs a finite training length"):
        PruningConfig().resolve(float("inf"))


def test_to_dict_is_plain_and_round_trips():
    config = PruningConfig(include=["fc"], exclude=["fc2"], end_step=9)
    plain = config.to_dict()
    assert plain["include"] == ["fc"] and plain["end_step"] == 9
    assert PruningConfig(**plain) == config
