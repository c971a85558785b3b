"""Trainer configuration: clear errors for inconsistent sizes, YAML round trip."""

import pytest

from rlhf_trainer.config import Config, ConfigError
from tests._helpers import toy_config


@pytest.mark.parametrize("sections,words", [
    ({"ppo": {"rollout_batch": 100, "minibatch": 64}}, "rollout_batch=100 is not divisible by ppo.minibatch=64"),
    ({"ppo": {"minibatch": 64, "micro_batch": 48}}, "minibatch=64 is not divisible by ppo.micro_batch=48"),
    ({"task": {"pad_token_id": 9, "eos_token_id": 9}}, "pad_token_id and eos_token_id are both 9"),
    ({"task": {"pad_token_id": 3}}, "pad_token_id=3 must be a special token"),
    ({"ppo": {"kl_estimator": "k4"}}, "kl_estimator"),
    ({"ppo": {"dual_clip": 0.5}}, "dual_clip must be > 1"),
    ({"ppo": {"loss_agg": "mean"}}, "loss_agg"),
    ({"model": {"n_embd": 30, "n_head": 4}}, "divisible by n_head"),
    ({"reward_model": {"loss": "hinge"}}, "loss must be one of bt, ranking, regression, ordinal, got 'hinge'"),
    ({"ppo": {"lrr": 1.0}}, "unknown ppo option(s): lrr"),
])
def test_inconsistent_configs_fail_clearly(sections, words):
    with pytest.raises(ConfigError) as info:
        toy_config(**sections)
    assert words in str(info.value)


def test_yaml_round_trip_and_accounting(tmp_path):
    cfg = toy_config(ppo={"rollout_batch": 128, "minibatch": 32, "micro_batch": 8, "epochs": 3})
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = Config.load(path)
    assert again.to_dict() == cfg.to_dict()
    assert again.ppo.accounting() == ("batch accounting: 128 rollouts -> 4 minibatches of 32 -> 4 micro-batches "
                                      "of 8 each (gradient accumulation 4); 3 epochs = 12 optimizer steps per PPO step")
