import pytest
import torch

from tiermoe.engine.request import SamplingParams
from tiermoe.engine.sampler import Sampler

CPU = torch.device("cpu")


def sampler(**fields) -> Sampler:
    """A sampler for the params the engine resolves (no generation_config.json defaults)."""
    return Sampler(SamplingParams(**fields).resolved({}, max_tokens=1), CPU)


def test_greedy_takes_the_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert int(sampler()(logits, None)) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    logits = torch.tensor([2.0, 1.9, -0.5, -0.6])
    penalised = sampler(repetition_penalty=2.0)
    assert int(penalised(logits, torch.tensor([0]))) == 1  # 2.0 -> 1.0 drops below 1.9
    assert int(penalised(torch.tensor([-0.5, -0.6, -9.0, -9.0]), torch.tensor([0]))) == 1  # -0.5 -> -1.0


def test_seed_reproduces_and_top_k_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def draws(seed: int) -> list[int]:
        s = sampler(temperature=1.0, seed=seed)
        return [int(s(logits, None)) for _ in range(40)]

    assert draws(7) == draws(7) and draws(7) != draws(8)  # 40 draws: equal by chance with p < 1e-9
    assert len(set(draws(7))) > 1
    top_k = sampler(temperature=1.0, top_k=2, seed=0)
    assert {int(top_k(logits, None)) for _ in range(200)} == {0, 1}
    top_p = sampler(temperature=1.0, top_p=0.7, seed=0)
    assert {int(top_p(logits, None)) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 reach 0.7


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    cold = sampler(temperature=0.05, seed=1)
    assert sum(int(cold(logits, None)) for _ in range(100)) == 0


@pytest.mark.parametrize("stop", [["ok", ""], [""]])
def test_empty_stop_string_is_refused(stop):
    with pytest.raises(Exception, match="stop strings must be non-empty"):
        SamplingParams(stop=stop)
