"""The op's key registries: one key per spec, kinds kept apart, unknown keys refused."""

import pytest

import patterndsl
from patterndsl import PatternError
from patterndsl.runtime import plans, ragged


def test_same_spec_same_key_and_kinds_apart():
    p = patterndsl.compile("pattern p { causal & window(3) }")
    a = plans.register(p.ir, (16, 16), "auto")
    assert plans.register(p.ir, (16, 16), "auto") == a
    assert plans.register(p.ir, (16, 32), "auto") != a
    assert plans.spec(a).block == (16, 16)
    r = ragged.register(p.ir, (16, 16), True)
    assert r == ragged.register(p.ir, (16, 16), True) and r.endswith(":paged")
    assert ragged.owns(r) and not ragged.owns(a)


def test_unknown_keys_are_pattern_errors():
    with pytest.raises(PatternError, match="unknown plan key 'p-nope'"):
        plans.spec("p-nope")
    with pytest.raises(PatternError, match="unknown ragged plan key 'r-nope'"):
        ragged._spec("r-nope")
