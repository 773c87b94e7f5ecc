"""Differential test of the losses against NeMo-RL's own loss code (issue 11 section 2): values AND gradients on
random inputs with masked rows, empty masks and extreme log-prob gaps.

NeMo-RL cannot be installed as a test dependency (the `nemo-rl` package on PyPI is a 7 kB placeholder, version
0.0.0, with no code), so its formulas are transcribed below into PyTorch, statement by statement, from:
- NVIDIA-NeMo/RL `nemo_rl/algorithms/loss/loss_functions.py` at commit
  006907a9570734f3e5d484c08ada84b0b89224c9: `ClippedPGLossFn.__call__` (KL term with its importance weights,
  PPO / force-on-policy / GSPO / CISPO / REINFORCE ratios, dual clip, tis / icepop / seq-mask-tis, sequence-level
  importance ratios, token- and sequence-level reduction) and `NLLLoss`;
- NVIDIA-NeMo/RL `nemo_rl/algorithms/utils.py`: `masked_mean` and `calculate_baseline_and_std_per_prompt` (the
  same at commits 7fb98c885ddbe4a763f02338d447c7f64fd764c1 and 004395398158769ab93f3f693983f1db6a239273) and
  `calculate_kl` in the version with `importance_sampling_weights` that the loss above calls;
- NVIDIA-NeMo/RL `nemo_rl/algorithms/advantage_estimator.py` at commit
  00925dd1e44b816b5cb6afa27d23d7bd7af2b957: `GRPOAdvantageEstimator` and `OPDAdvantageEstimator` (MOPD).
Inputs are already shifted (NeMo-RL's `[:, 1:]`); NeMo-RL computes in float32, and so does the reference here.
"""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import losses

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------- NeMo-RL, transcribed (torch)


def nemo_masked_mean(values, mask, dim=None, global_normalization_factor=None):
    normalization_factor = torch.sum(mask, dim=dim) if global_normalization_factor is None else \
        global_normalization_factor
    return torch.sum(values * mask, dim=dim) / (normalization_factor + 1e-8)


def nemo_calculate_kl(logprobs, logprobs_reference, kl_type="k3", input_clamp_value=20.0, output_clamp_value=10.0,
                      importance_sampling_weights=None):
    logr = logprobs_reference - logprobs
    if input_clamp_value is not None:
        logr_clamped = logr.clamp(min=-input_clamp_value, max=input_clamp_value)
        if importance_sampling_weights is not None:
            importance_sampling_weights = torch.where(logr == logr_clamped, importance_sampling_weights,
                                                      importance_sampling_weights.detach())
        logr = logr_clamped
    if kl_type == "k1":
        kl = -logr
    elif kl_type == "k2":
        kl = torch.square(logr) / 2
    elif kl_type == "k3":
        kl = torch.exp(logr) - 1 - logr
    else:
        raise ValueError(f"Invalid KL type: {kl_type}")
    if importance_sampling_weights is not None:
        kl = importance_sampling_weights * kl
    if output_clamp_value is not None:
        kl = kl.clamp(min=-output_clamp_value, max=output_clamp_value)
    return kl


NEMO_DEFAULTS = dict(
    disable_ppo_ratio=False, token_level_loss=True, sequence_level_importance_ratios=False, ratio_clip_min=0.2,
    ratio_clip_max=0.2, ratio_clip_c=None, reference_policy_kl_penalty=0.0, reference_policy_kl_type="k3",
    kl_input_clamp_value=20.0, kl_output_clamp_value=10.0, use_importance_sampling_correction=False,
    truncated_importance_sampling_type=None, truncated_importance_sampling_ratio=None,
    truncated_importance_sampling_ratio_min=None, use_on_policy_kl_approximation=False,
    force_on_policy_ratio=False, use_cispo=False)


def nemo_clipped_pg_loss(cfg, curr_logprobs, data, global_valid_seqs, global_valid_toks):
    """`ClippedPGLossFn.__call__` (policy-gradient branch), returning the loss."""
    cfg = {**NEMO_DEFAULTS, **cfg}
    token_level = cfg["token_level_loss"]
    if cfg["sequence_level_importance_ratios"]:
        assert not token_level
    if cfg["truncated_importance_sampling_type"] == "seq-mask-tis":
        assert not cfg["sequence_level_importance_ratios"]
    token_mask, sample_mask, advantages = data["token_mask"], data["sample_mask"], data["advantages"]
    prev_logprobs = None if cfg["force_on_policy_ratio"] else data["prev_logprobs"]
    generation_logprobs = data["generation_logprobs"]
    beta = cfg["reference_policy_kl_penalty"]
    if beta != 0:
        reference_policy_logprobs = data["reference_policy_logprobs"]
        curr_logprobs_unfiltered = curr_logprobs
    mask = token_mask * sample_mask.unsqueeze(-1)
    if cfg["force_on_policy_ratio"]:
        prev_logprobs = curr_logprobs.detach()

    if beta != 0:
        if cfg["use_on_policy_kl_approximation"]:
            kl_importance_weights = torch.exp(curr_logprobs_unfiltered - generation_logprobs)
        else:
            kl_importance_weights = torch.exp(curr_logprobs_unfiltered - curr_logprobs_unfiltered.detach())
        kl_importance_weights = torch.nan_to_num(kl_importance_weights, nan=0.0, posinf=0.0, neginf=0.0)
        kl = beta * nemo_calculate_kl(curr_logprobs_unfiltered, reference_policy_logprobs,
                                      cfg["reference_policy_kl_type"], cfg["kl_input_clamp_value"],
                                      cfg["kl_output_clamp_value"], importance_sampling_weights=kl_importance_weights)
        if token_level:
            kl = nemo_masked_mean(kl, mask, global_normalization_factor=global_valid_toks)
        else:
            kl = nemo_masked_mean(nemo_masked_mean(kl, token_mask, dim=-1), sample_mask,
                                  global_normalization_factor=global_valid_seqs)
    else:
        kl = torch.tensor(0.0)

    if cfg["force_on_policy_ratio"]:
        ratios = (curr_logprobs - curr_logprobs.detach()).exp()
        ratios_clamped = ratios
    elif not cfg["disable_ppo_ratio"]:
        log_ratios = curr_logprobs - prev_logprobs
        if cfg["sequence_level_importance_ratios"]:
            seq_ratio = nemo_masked_mean(log_ratios, token_mask, dim=-1).unsqueeze(-1).exp()
            ratios = seq_ratio.repeat(1, advantages.shape[1])
        else:
            ratios = log_ratios.exp()
        ratios_clamped = ratios.clamp(1.0 - cfg["ratio_clip_min"], 1.0 + cfg["ratio_clip_max"])
    else:
        ratios = curr_logprobs
        ratios_clamped = curr_logprobs
    if cfg["use_cispo"]:
        clip_loss = -advantages * ratios_clamped.detach() * curr_logprobs
    else:
        clip_loss = torch.max(-advantages * ratios, -advantages * ratios_clamped)
    if cfg["ratio_clip_c"] is not None:
        clip_loss = torch.where(advantages < 0, torch.min(clip_loss, -advantages * cfg["ratio_clip_c"]), clip_loss)

    if cfg["sequence_level_importance_ratios"]:
        seq_lp_diff = ((prev_logprobs - generation_logprobs) * mask).sum(dim=-1)
        weights = torch.nan_to_num(torch.exp(seq_lp_diff).detach(), nan=0.0, posinf=0.0, neginf=0.0).unsqueeze(-1)
    else:
        weights = torch.nan_to_num(torch.exp(prev_logprobs - generation_logprobs), nan=0.0, posinf=0.0,
                                   neginf=0.0)
    kind, high, low = (cfg["truncated_importance_sampling_type"], cfg["truncated_importance_sampling_ratio"],
                       cfg["truncated_importance_sampling_ratio_min"])
    if high is not None:
        if kind == "tis":
            weights = torch.clamp(weights, min=0.0 if low is None else low, max=high)
        elif kind == "icepop":
            weights = torch.where((weights >= low) & (weights <= high), weights, torch.zeros_like(weights))
        elif kind == "seq-mask-tis":
            log_is_ratio = torch.nan_to_num(prev_logprobs - generation_logprobs, nan=0.0, posinf=0.0, neginf=0.0)
            seq_geomean = torch.exp(nemo_masked_mean(log_is_ratio, token_mask, dim=-1)).detach()
            seq_kept = ((seq_geomean >= low) & (seq_geomean <= high)).float()
            weights = weights * seq_kept.unsqueeze(-1)
    if not cfg["use_importance_sampling_correction"]:
        weights = torch.ones_like(prev_logprobs)
    if token_level:
        actor_loss = nemo_masked_mean(weights * clip_loss, mask, global_normalization_factor=global_valid_toks)
    else:
        actor_loss = nemo_masked_mean(nemo_masked_mean(weights * clip_loss, token_mask, dim=-1), sample_mask,
                                      global_normalization_factor=global_valid_seqs)
    return actor_loss + kl


def nemo_grpo_advantages(prompts, rewards, leave_one_out_baseline, normalize_rewards):
    """`calculate_baseline_and_std_per_prompt` (all samples valid) and `GRPOAdvantageEstimator`."""
    valid_mask = torch.ones_like(rewards)
    unique_prompts = torch.unique(prompts, dim=0)
    baseline, std = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i in range(len(unique_prompts)):
        prompt_idx = torch.arange(len(prompts))[(prompts == unique_prompts[i]).all(1)]
        n = len(prompt_idx)
        matrix = (1 - torch.eye(n)) if leave_one_out_baseline else torch.ones((n, n))
        matrix = matrix.to(rewards.dtype)
        if valid_mask[prompt_idx].sum() <= 1:
            baseline[prompt_idx] = rewards[prompt_idx]
        else:
            num_valid = valid_mask[prompt_idx].float().sum() - int(leave_one_out_baseline)
            prompt_baseline = torch.matmul(matrix, rewards[prompt_idx] * valid_mask[prompt_idx]) / num_valid
            prompt_baseline_square = torch.matmul(matrix, torch.pow(rewards[prompt_idx], 2)
                                                  * valid_mask[prompt_idx]) / num_valid
            baseline[prompt_idx] = prompt_baseline
            std[prompt_idx] = ((prompt_baseline_square - prompt_baseline.square())
                               * (num_valid / (num_valid - 1))).sqrt().nan_to_num(0)
    advantages = (rewards - baseline).unsqueeze(-1)
    if normalize_rewards:
        non_zero = std > 0
        advantages[non_zero] = advantages[non_zero] / (std.unsqueeze(-1)[non_zero] + 1e-6)
    return advantages[:, 0]


# ----------------------------------------------------------------------------------------- inputs


def make_batch(seed, extreme=False, batch=6, length=7):
    """Log-probs with a masked sample (sample_mask 0), a valid sample with an empty token mask, and (extreme)
    train/rollout gaps of +-100 (exp overflows in float32), policy/old gaps of +-8, reference gaps of +-40."""
    rng = np.random.default_rng(seed)
    curr = -rng.uniform(0.05, 4.0, size=(batch, length))
    prev = curr + rng.normal(scale=0.3, size=curr.shape)
    gen = prev + rng.normal(scale=0.4, size=curr.shape)
    ref = curr + rng.normal(scale=1.0, size=curr.shape)
    if extreme:
        pick = rng.random(curr.shape)
        gen = np.where(pick < 0.15, prev - 100.0, np.where(pick > 0.85, prev + 100.0, gen))
        prev = np.where((pick > 0.4) & (pick < 0.5), curr + rng.choice([-8.0, 8.0], size=curr.shape), prev)
        ref = np.where((pick > 0.5) & (pick < 0.65), curr + rng.choice([-40.0, 40.0], size=curr.shape), ref)
    token_mask = (rng.random(curr.shape) < 0.8).astype(np.float64)
    token_mask[:, 0] = 1.0
    token_mask[1] = 0.0  # a valid sample with no trainable token
    sample_mask = np.ones(batch)
    sample_mask[3] = 0.0  # a masked-out sample
    advantages = rng.normal(size=(batch, 1)) * np.ones((1, length))
    return dict(curr=curr, prev=prev, gen=gen, ref=ref, token_mask=token_mask, sample_mask=sample_mask,
                advantages=advantages)


def run_nemo(cfg, b, dtype=torch.float32):
    t = {k: torch.tensor(v, dtype=dtype) for k, v in b.items()}
    curr = t["curr"].clone().requires_grad_(True)
    mask = t["token_mask"] * t["sample_mask"].unsqueeze(-1)
    data = dict(token_mask=t["token_mask"], sample_mask=t["sample_mask"], advantages=t["advantages"],
                prev_logprobs=t["prev"], generation_logprobs=t["gen"], reference_policy_logprobs=t["ref"])
    loss = nemo_clipped_pg_loss(cfg, curr, data, global_valid_seqs=t["sample_mask"].sum(), global_valid_toks=mask.sum())
    (grad,) = torch.autograd.grad(loss, curr, allow_unused=True)
    grad = torch.zeros_like(curr) if grad is None else grad
    return float(loss.detach()), grad.double().numpy()


def ours_from_nemo_config(cfg):
    """The project call equivalent to a NeMo-RL ClippedPGLossFn config (the table in losses/README.md)."""
    cfg = {**NEMO_DEFAULTS, **cfg}
    pg = dict(clip_low=cfg["ratio_clip_min"], clip_high=cfg["ratio_clip_max"], dual_clip=cfg["ratio_clip_c"],
              aggregation="token_mean" if cfg["token_level_loss"] else "seq_mean_token_mean")
    pg["ratio"] = ("on_policy" if cfg["force_on_policy_ratio"] else "cispo" if cfg["use_cispo"] else
                   "gspo" if cfg["sequence_level_importance_ratios"] else "ppo")
    if cfg["sequence_level_importance_ratios"]:
        pg["is_level"] = "sequence"
    if cfg["use_importance_sampling_correction"]:
        kind = cfg["truncated_importance_sampling_type"] if cfg["truncated_importance_sampling_ratio"] else None
        pg["is_correction"] = {None: "is", "tis": "tis", "icepop": "icepop", "seq-mask-tis": "seq_mask_tis"}[kind]
        if kind is not None:
            pg["is_high"] = cfg["truncated_importance_sampling_ratio"]
            pg["is_low"] = cfg["truncated_importance_sampling_ratio_min"] or 0.0
    kl = None
    if cfg["reference_policy_kl_penalty"]:
        kl = dict(beta=cfg["reference_policy_kl_penalty"], kind=cfg["reference_policy_kl_type"],
                  input_clamp=cfg["kl_input_clamp_value"], output_clamp=cfg["kl_output_clamp_value"],
                  on_policy=cfg["use_on_policy_kl_approximation"])
    return pg, kl


def run_ours(cfg, b):
    pg, kl = ours_from_nemo_config(cfg)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    mask = f32(b["token_mask"] * b["sample_mask"][:, None])
    num_tokens, num_sequences = jnp.sum(mask), jnp.sum(f32(b["sample_mask"]))

    def loss_fn(lp):
        old = None if pg["ratio"] == "on_policy" else f32(b["prev"])
        loss, _ = losses.policy_gradient_loss(lp, old, f32(b["advantages"]), mask, rollout_logprobs=f32(b["gen"]),
                                              num_tokens=num_tokens, num_sequences=num_sequences, **pg)
        if kl is not None:
            per_token = losses.kl_penalty(lp, f32(b["ref"]), kl["kind"], mask=mask, input_clamp=kl["input_clamp"],
                                          output_clamp=kl["output_clamp"],
                                          sampling_logprobs=f32(b["gen"]) if kl["on_policy"] else None)
            loss = loss + kl["beta"] * losses.aggregate_loss(per_token, mask, pg["aggregation"],
                                                             num_tokens=num_tokens, num_sequences=num_sequences)
        return loss

    loss, grad = jax.value_and_grad(loss_fn)(f32(b["curr"]))
    return float(loss), np.asarray(grad, np.float64)


def assert_matches(ours, nemo, rtol=2e-5):
    (loss, grad), (want_loss, want_grad) = ours, nemo
    scale = max(abs(want_loss), 1e-3)
    np.testing.assert_allclose(loss, want_loss, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol * max(np.abs(want_grad).max(), 1e-3))


# ------------------------------------------------------------------------------- policy gradient + KL

KL = dict(reference_policy_kl_penalty=0.05)
IS = dict(use_importance_sampling_correction=True)
CONFIGS = {
    "ppo": dict(ratio_clip_max=0.28),
    "ppo_seq_level": dict(token_level_loss=False),
    "dual_clip": dict(ratio_clip_c=3.0),
    "force_on_policy": dict(force_on_policy_ratio=True),
    "cispo": dict(use_cispo=True, ratio_clip_max=0.28),
    "gspo": dict(sequence_level_importance_ratios=True, token_level_loss=False, ratio_clip_min=3e-4,
                 ratio_clip_max=4e-4),
    "is_untruncated": dict(**IS),
    "tis_max_only": dict(**IS, truncated_importance_sampling_type="tis", truncated_importance_sampling_ratio=2.0),
    "tis_min_max": dict(**IS, truncated_importance_sampling_type="tis", truncated_importance_sampling_ratio=2.0,
                        truncated_importance_sampling_ratio_min=0.5),
    "icepop": dict(**IS, truncated_importance_sampling_type="icepop", truncated_importance_sampling_ratio=2.0,
                   truncated_importance_sampling_ratio_min=0.5),
    "seq_mask_tis": dict(**IS, truncated_importance_sampling_type="seq-mask-tis",
                         truncated_importance_sampling_ratio=1.2, truncated_importance_sampling_ratio_min=0.8),
    "gspo_seq_is_tis": dict(sequence_level_importance_ratios=True, token_level_loss=False, **IS,
                            truncated_importance_sampling_type="tis", truncated_importance_sampling_ratio=2.0,
                            truncated_importance_sampling_ratio_min=0.5),
    "gspo_seq_is_icepop": dict(sequence_level_importance_ratios=True, token_level_loss=False, **IS,
                               truncated_importance_sampling_type="icepop", truncated_importance_sampling_ratio=5.0,
                               truncated_importance_sampling_ratio_min=0.2),
    "on_policy_is_icepop_seq": dict(force_on_policy_ratio=True, token_level_loss=False, **IS,
                                    truncated_importance_sampling_type="icepop",
                                    truncated_importance_sampling_ratio=2.0,
                                    truncated_importance_sampling_ratio_min=0.5),
    "kl_k1": dict(**KL, reference_policy_kl_type="k1"),
    "kl_k2": dict(**KL, reference_policy_kl_type="k2"),
    "kl_k3": dict(**KL),
    "kl_k3_seq_level": dict(**KL, token_level_loss=False),
    "kl_k3_on_policy_approximation": dict(**KL, use_on_policy_kl_approximation=True),
    "kl_k2_on_policy_approximation_seq": dict(**KL, reference_policy_kl_type="k2", token_level_loss=False,
                                              use_on_policy_kl_approximation=True),
    "kl_k3_tight_clamps": dict(**KL, kl_input_clamp_value=1.0, kl_output_clamp_value=0.5),
    "kl_force_on_policy_icepop": dict(**KL, force_on_policy_ratio=True, **IS, truncated_importance_sampling_type="icepop",
                                      truncated_importance_sampling_ratio=2.0,
                                      truncated_importance_sampling_ratio_min=0.5),
}


@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme_gaps"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clipped_pg_loss_matches_nemo_rl(name, extreme):
    batch = make_batch(zlib.crc32(name.encode()) % 10_000, extreme=extreme)
    want = run_nemo(CONFIGS[name], batch)
    got = run_ours(CONFIGS[name], batch)
    assert np.isfinite(want[0]) and np.all(np.isfinite(got[1]))
    broken = ~np.isfinite(want[1])
    if broken.any():
        # NeMo-RL bug: with the on-policy KL approximation, a token whose weight exp(curr - generation)
        # overflows gets weight 0 from nan_to_num but a NaN gradient (nan_to_num does not stop the inf*0 in
        # the backward pass). The project gives such a token no KL gradient: only its policy-gradient part.
        assert CONFIGS[name].get("use_on_policy_kl_approximation") and extreme
        assert np.all(np.asarray(batch["curr"] - batch["gen"])[broken] > 80)
        _, actor_only = run_nemo({**CONFIGS[name], "reference_policy_kl_penalty": 0.0}, batch)
        want = (want[0], np.where(broken, actor_only, want[1]))
    assert_matches(got, want)


@pytest.mark.parametrize("name", ["ppo", "icepop", "kl_k3", "gspo_seq_is_tis"])
def test_an_empty_mask_gives_zero_loss_and_gradient_like_nemo_rl(name):
    batch = make_batch(5)
    batch["token_mask"][:] = 0.0
    want = run_nemo(CONFIGS[name], batch)
    got = run_ours(CONFIGS[name], batch)
    assert want[0] == 0.0 and not np.any(want[1])
    assert got[0] == 0.0 and not np.any(got[1])


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_kl_without_clamps_matches_nemo_rl_in_float64(kind, on_policy):
    """Reference gaps up to 15 nats without clamps: NeMo-RL's float32 autograd of exp(logr) - 1 - logr
    cancels two numbers near e^15; the project's closed form matches its float64 value to float32 precision."""
    rng = np.random.default_rng(7)
    batch = make_batch(8)
    batch["ref"] = batch["curr"] + rng.uniform(-15.0, 15.0, size=batch["curr"].shape)
    cfg = dict(reference_policy_kl_penalty=1.0, reference_policy_kl_type=kind, kl_input_clamp_value=None,
               kl_output_clamp_value=None, use_on_policy_kl_approximation=on_policy)
    want = run_nemo(cfg, batch, dtype=torch.float64)
    assert_matches(run_ours(cfg, batch), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- MOPD


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("minibatch", ["first", "later"])
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme_gaps"])
def test_mopd_matches_nemo_rl(token_level, minibatch, extreme):
    """NeMo-RL's MOPD: OPD advantages sg(teacher - prev) with the REINFORCE loss (disable_ppo_ratio) and
    ICE-POP weights exp(prev - generation). On the first minibatch prev = curr."""
    batch = make_batch(11 + token_level + 2 * extreme, extreme=extreme)
    teacher = batch["ref"]
    if minibatch == "first":
        batch["prev"] = batch["curr"].copy()
    mask = batch["token_mask"] * batch["sample_mask"][:, None]
    batch["advantages"] = (teacher - batch["prev"]) * mask
    cfg = dict(disable_ppo_ratio=True, token_level_loss=token_level, **IS, truncated_importance_sampling_type="icepop",
               truncated_importance_sampling_ratio=2.0, truncated_importance_sampling_ratio_min=0.5)
    want = run_nemo(cfg, batch)

    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    jmask = f32(mask)

    def loss_fn(lp, old):
        return losses.mopd_loss(lp, f32(teacher), f32(batch["gen"]), jmask, old_logprobs=old,
                                aggregation="token_mean" if token_level else "seq_mean_token_mean",
                                num_tokens=jnp.sum(jmask), num_sequences=jnp.sum(f32(batch["sample_mask"])))[0]

    got = jax.value_and_grad(loss_fn)(f32(batch["curr"]), f32(batch["prev"]))
    assert_matches((float(got[0]), np.asarray(got[1], np.float64)), want)
    if minibatch == "first":  # the default old_logprobs (stop_gradient(logprobs)) is the same thing
        default = jax.value_and_grad(loss_fn)(f32(batch["curr"]), None)
        assert_matches((float(default[0]), np.asarray(default[1], np.float64)), want)


# ------------------------------------------------------------------------------------- advantages, SFT


@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("leave_one_out,normalize", list(itertools.product([True, False], [True, False])))
@pytest.mark.parametrize("rewards_kind", ["binary", "continuous"])
def test_group_advantages_match_nemo_rl(group_size, leave_one_out, normalize, rewards_kind):
    rng = np.random.default_rng(group_size * 7 + leave_one_out * 3 + normalize)
    groups = 6
    rewards = (rng.random(groups * group_size) < 0.4).astype(np.float64) if rewards_kind == "binary" else \
        rng.normal(size=groups * group_size)
    if rewards_kind == "binary":
        rewards[:group_size] = 1.0  # one group all equal
        rewards[group_size:2 * group_size] = 0.0
        rewards[group_size] = 1.0  # one group with a single success
    prompts = torch.tensor(np.repeat(np.arange(groups), group_size)[:, None] * np.ones((1, 3)), dtype=torch.long)
    want = nemo_grpo_advantages(prompts, torch.tensor(rewards), leave_one_out, normalize).numpy()
    got = losses.group_advantages(jnp.asarray(rewards, jnp.float32), group_size, leave_one_out=leave_one_out,
                                  normalize_std=normalize, leave_one_out_std=leave_one_out)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5)


def test_sft_loss_matches_nemo_rl_nll():
    batch = make_batch(3)
    mask = batch["token_mask"] * batch["sample_mask"][:, None]
    curr = torch.tensor(batch["curr"], dtype=torch.float32, requires_grad=True)
    tmask = torch.tensor(mask, dtype=torch.float32)
    want_loss = -nemo_masked_mean(curr, tmask, global_normalization_factor=tmask.sum())
    (want_grad,) = torch.autograd.grad(want_loss, curr)
    got = jax.value_and_grad(lambda lp: losses.sft_loss(lp, jnp.asarray(mask), num_tokens=float(mask.sum())))(
        jnp.asarray(batch["curr"], jnp.float32))
    assert_matches((float(got[0]), np.asarray(got[1], np.float64)),
                   (float(want_loss.detach()), want_grad.double().numpy()))


def test_sequence_count_convention():
    """NeMo-RL's sequence-level mean divides by the valid samples, counting one with an empty token mask;
    `token_and_sequence_counts(count_empty_rows=True)` gives that count, the default does not."""
    batch = make_batch(4)
    batch["sample_mask"][:] = 1.0
    mask = batch["token_mask"]  # row 1 is empty
    cfg = dict(token_level_loss=False)
    want = run_nemo(cfg, batch)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    for count_empty_rows in (True, False):
        num_tokens, num_sequences = losses.token_and_sequence_counts(jnp.asarray(mask), count_empty_rows=count_empty_rows)
        loss, _ = losses.policy_gradient_loss(f32(batch["curr"]), f32(batch["prev"]), f32(batch["advantages"]),
                                              f32(mask), aggregation="seq_mean_token_mean",
                                              num_sequences=num_sequences)
        if count_empty_rows:
            np.testing.assert_allclose(float(loss), want[0], rtol=2e-5)
        else:
            np.testing.assert_allclose(float(loss), want[0] * mask.shape[0] / (mask.shape[0] - 1), rtol=2e-5)
