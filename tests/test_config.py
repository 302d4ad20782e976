"""Profiles: one JacobiConfig per stage that decodes, stage defaults kept when a profile sets part of it, and the
stages held consistent (evaluation within the budget the CLLM learned)."""

import pytest
from pydantic import ValidationError

from cllm_core.runtime.config import CollectConfig, JacobiConfig, Profile, describe, set_value


def test_a_jacobi_section_given_in_part_keeps_its_stage_defaults():
    profile = Profile.model_validate({"collect": {"jacobi": {"n_tokens": 8}}, "decode": {"n_tokens": 4}})
    assert profile.collect.jacobi == JacobiConfig(n_tokens=8, init="random", carry=False)  # the paper's states
    assert profile.decode == JacobiConfig(n_tokens=4, max_new_tokens=128)  # decode's own budget
    assert CollectConfig(jacobi={"max_new_tokens": 64}).jacobi == JacobiConfig(n_tokens=16, max_new_tokens=64,
                                                                     init="random", carry=False)


def test_evaluation_budget_defaults_to_collections_and_may_not_exceed_it():
    data = {}
    set_value(data, "collect.jacobi.max_new_tokens=96")
    assert Profile.model_validate(data).evaluate.jacobi.max_new_tokens == 96
    set_value(data, "evaluate.jacobi.max_new_tokens=64")
    assert Profile.model_validate(data).evaluate.jacobi.max_new_tokens == 64
    set_value(data, "evaluate.jacobi.max_new_tokens=128")
    with pytest.raises(ValidationError) as error:
        Profile.model_validate(data)
    assert "evaluate.jacobi.max_new_tokens (128) is over collect.jacobi.max_new_tokens (96)" in describe(error.value)


@pytest.mark.parametrize(("data", "expected"), [
    ({"collect": {"n_tokens": 8}}, "collect.n_tokens is now collect.jacobi.n_tokens"),
    ({"evaluate": {"init": "random"}}, "evaluate.init is now evaluate.jacobi.init"),
    ({"collect": {"jacobi": {"n_tokens": None}}}, "collection needs a block size: set collect.jacobi.n_tokens"),
    ({"decode": {"n_tokens": 64, "max_new_tokens": 32}}, "decode: Value error, n_tokens (64) is larger than "
                                                         "max_new_tokens (32)"),
])
def test_a_misplaced_or_inconsistent_jacobi_setting_is_one_line_naming_it(data, expected):
    with pytest.raises(ValidationError) as error:
        Profile.model_validate(data)
    assert expected in describe(error.value)


def test_a_second_round_says_only_what_differs_from_the_first():
    data = {"collect": {"jacobi": {"n_tokens": 8, "max_new_tokens": 64}, "batch_size": 4},
            "finetune": {"steps": 50, "lr": 1e-3}, "evaluate": {"jacobi": {"n_tokens": 16}}}
    set_value(data, "second_round.collect.jacobi.n_tokens=16")
    set_value(data, "second_round.finetune.steps=20")
    second = Profile.model_validate(data).second_round
    assert second.collect.jacobi == JacobiConfig(n_tokens=16, max_new_tokens=64, init="random", carry=False)
    assert second.collect.batch_size == 4 and (second.finetune.steps, second.finetune.lr) == (20, 1e-3)
    assert Profile.model_validate(Profile.model_validate(data).model_dump()).second_round == second  # stable
    del data["evaluate"]
    with pytest.raises(ValidationError) as error:
        Profile.model_validate(data)
    assert "second_round collects at n_tokens 16, round 1 at 8: both CLLMs are evaluated at one block size; set " \
           "evaluate.jacobi.n_tokens" in describe(error.value)


def test_a_second_round_checks_its_trajectories_against_the_teachers_unless_told_otherwise():
    data = {"collect": {"jacobi": {"n_tokens": 8}}, "second_round": {"finetune": {"steps": 2}}}
    assert Profile.model_validate(data).second_round.collection("w/trajectories").reference == "w/trajectories"
    set_value(data, "second_round.teacher_fixed_points=false")
    assert Profile.model_validate(data).second_round.collection("w/trajectories").reference is None
    set_value(data, "second_round.collect.reference=other")  # a reference the profile names is kept either way
    set_value(data, "second_round.teacher_fixed_points=true")
    assert Profile.model_validate(data).second_round.collection("w/trajectories").reference == "other"
