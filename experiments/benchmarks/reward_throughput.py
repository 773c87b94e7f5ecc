r"""Reward-step throughput: 2,048 mixed math / instruction-following / MCQA responses, in-process and on pools.

Run from the repository root:

    python -m experiments.benchmarks.reward_throughput --output=/tmp/reward_throughput.json

The batch is synthetic but shaped like Cascade RL rollouts: every response has a thinking part (with decoys the
verifiers must ignore: a boxed number, commas, an "Answer:" line) and an answer part; about half the answers are
right. Like a GRPO batch it is 128 prompts x 16 rollouts (the rollouts of a prompt share its spec), the domains
taking turns. Configurations, side by side in one run: in-process (one core, no time limits), a pool of 1
worker, and a pool of every available CPU. Each scores a warm-up batch (parser caches, ANTLR's DFA), then
``--repeats`` different batches; the two pools take turns on each batch, so that a change of load on a shared
machine hits both alike. Reported per pool: wall time per batch, the verifiers' CPU-seconds per batch and
``busy_cores`` (CPU-seconds / wall seconds: how many cores the reward step kept busy), and
``machine_busy_cores`` (the same for the whole machine, from /proc/stat: if it exceeds ``busy_cores``, other
processes were competing for the cores). Pool start-up (the first
start includes the fork server's imports) is timed separately. All configurations must give the same rewards;
the script checks.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time

from absl import app, flags

from nemotron_jax.rewards import RewardPool, available_cpus, score_in_process

_OUTPUT = flags.DEFINE_string("output", "reward_throughput.json", "Where to write the JSON results.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2048, "Responses per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed batches (different ones) per configuration; best counts.")
_MAX_WORKERS = flags.DEFINE_integer("max_workers", 0, "Workers of the large pool; 0 = every available CPU.")

_WORDS = (
    "the of and to in is we that for it as with be on by this are from at or an which so then since let "
    "value equation number term sum product side both square root factor common denominator solve check "
    "result case step first second next now thus therefore because consider note assume gives yields"
).split()


def _math_problem(rng: random.Random) -> tuple[str, str, str]:
    """(ground truth, an equivalent way of writing it, a wrong answer that looks close), random numbers."""
    a, b, c = rng.randint(2, 97), rng.randint(2, 97), rng.randint(2, 9)
    kind = rng.randrange(8)
    if kind == 0:
        return (f"\\frac{{{a}}}{{{a + b}}}", f"{a}/{a + b}", f"\\frac{{{a + 1}}}{{{a + b}}}")
    if kind == 1:
        return (f"{c}\\sqrt{{{b}}}", f"\\sqrt{{{c * c * b}}}", f"{c}\\sqrt{{{b + 1}}}")
    if kind == 2:
        return (f"({a}, {a + b}]", f"({a},{a + b}]", f"[{a},{a + b}]")
    if kind == 3:
        return (f"\\{{{a}, {b}, {c}\\}}", f"\\{{{c},{b},{a}\\}}", f"\\{{{a},{b}\\}}")
    if kind == 4:
        return (f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}", f"x^2+{a * a}")
    if kind == 5:
        return (f"{a}.{b:02d}", f"{a}.{b:02d}0", f"{a}.{b + 1:02d}")
    if kind == 6:
        return (f"\\frac{{{a}\\pi}}{{{b}}}", f"{a}\\pi/{b}", f"\\frac{{{a}\\pi}}{{{b + 1}}}")
    return (str(a * b), str(a * b), str(a * b + c))


_MCQA_FORMATS = [
    (r"Answer\s*:\s*(?!Answer)\s*([A-Za-z])\s*", "Answer: {}"),
    (r"\\boxed\{\s*([A-Za-z])\s*\}", r"Answer: \boxed{{{}}}"),
    (r"Final Choice:\s*([A-Za-z])\s*", "Final Choice: {}"),
    (None, "The answer is ({})."),
]


def _prose(rng: random.Random, sentences: int, *, commas: bool = True) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        if commas and rng.random() < 0.5:
            words[len(words) // 2] += ","
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def _thinking(rng: random.Random) -> str:
    # 2-20 KB of reasoning with decoys the verifiers must not grade.
    return f"<think>{_prose(rng, rng.randint(20, 200))} Maybe \\boxed{{17}}? Answer: A, commas, everywhere.</think>\n"


def _math_prompt(rng: random.Random) -> tuple[dict, list[str]]:
    truth, equivalent, wrong = _math_problem(rng)
    return {"expected_answer": truth}, [truth, equivalent, wrong]


def _math_rollout(rng: random.Random, shown_answers: list[str]) -> str:
    shown = rng.choice(shown_answers)
    answer = f"{_prose(rng, rng.randint(2, 8))}\n\nTherefore the final answer is $\\boxed{{{shown}}}$."
    return _thinking(rng) + answer


def _mcqa_prompt(rng: random.Random) -> tuple[dict, tuple[str, str]]:
    letters = "ABCDEFGHIJ"
    regex, template = rng.choice(_MCQA_FORMATS)
    spec = {
        "expected_answer": rng.choice(letters),
        "options": [{letter: f"option {letter}"} for letter in letters],
        "template_metadata": {"output_regex": regex} if regex else {},
    }
    return spec, (spec["expected_answer"], template)


def _mcqa_rollout(rng: random.Random, prompt: tuple[str, str]) -> str:
    expected, template = prompt
    chosen = expected if rng.random() < 0.5 else rng.choice("ABCDEFGHIJ")
    return _thinking(rng) + _prose(rng, rng.randint(1, 6)) + "\n" + template.format(chosen)


_IF_IDS = [
    "punctuation:no_comma",
    "detectable_format:title",
    "detectable_content:postscript",
    "length_constraints:number_words",
    "language:response_language",
    "length_constraints:number_sentences",
]
_IF_KWARGS = [None, {}, {"postscript_marker": "P.S."}, {"num_words": 20, "relation": "at least"},
              {"language": "en"}, {"num_sentences": 40, "relation": "less than"}]  # fmt: skip


def _if_prompt(rng: random.Random) -> tuple[dict, None]:
    chosen = sorted(rng.sample(range(len(_IF_IDS)), rng.randint(2, 4)))
    # Pad the kwargs with other instructions' keys set to None, as the released data does.
    padded = [{"keywords": None, "end_phrase": None, **(_IF_KWARGS[index] or {})} for index in chosen]
    return {"instruction_id_list": [_IF_IDS[index] for index in chosen], "kwargs": padded}, None


def _if_rollout(rng: random.Random, prompt: None) -> str:
    follow = rng.random() < 0.5
    paragraphs = rng.randint(2, 5)
    body = "\n\n".join(_prose(rng, rng.randint(2, 6), commas=not follow) for _ in range(paragraphs))
    if follow:
        body = "<<A Short Title>>\n" + body + "\n\nP.S. Thanks for reading."
    return _thinking(rng) + body


_DOMAINS = (
    ("math_with_judge_simple_agent", _math_prompt, _math_rollout),
    ("instruction_following_simple_agent", _if_prompt, _if_rollout),
    ("mcqa_simple_agent", _mcqa_prompt, _mcqa_rollout),
)


def make_batch(size: int, seed: int, rollouts_per_prompt: int = 16) -> tuple[list[str], list[dict], list[str]]:
    """``size // rollouts_per_prompt`` prompts (domains in turn), each with ``rollouts_per_prompt`` responses."""
    rng = random.Random(seed)
    responses, specs, domains = [], [], []
    for prompt_index in range(size // rollouts_per_prompt):
        domain, make_prompt, make_rollout = _DOMAINS[prompt_index % len(_DOMAINS)]
        spec, prompt = make_prompt(rng)
        for _ in range(rollouts_per_prompt):
            responses.append(make_rollout(rng, prompt))
            specs.append(spec)
            domains.append(domain)
    return responses, specs, domains


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as file:
            fields = [int(value) for value in file.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_cores(before, after, wall_s: float) -> float | None:
    """Cores the WHOLE machine kept busy (this benchmark and everything else) over ``wall_s`` seconds."""
    if before is None or after is None:
        return None
    return round((after[0] - before[0]) / os.sysconf("SC_CLK_TCK") / wall_s, 2)


def _pool_figures(num_workers: int, startup_s: float, warm_up_stats, timed_stats) -> dict:
    seconds = [stats.wall_time_s for stats in timed_stats]
    return {
        "num_workers": num_workers,
        "startup_s": round(startup_s, 3),
        "warm_up_batch_s": round(warm_up_stats.wall_time_s, 3),
        "batch_s": [round(each, 3) for each in seconds],
        "best_batch_s": round(min(seconds), 3),
        "items_per_s": round(timed_stats[0].num_items / min(seconds), 1),
        # CPU-seconds of verification per batch, and how many cores were busy on average while it ran.
        "verifier_cpu_s": [round(stats.verifier_cpu_s, 3) for stats in timed_stats],
        "busy_cores": [round(stats.verifier_cpu_s / stats.wall_time_s, 2) for stats in timed_stats],
        "failures": warm_up_stats.num_failures + sum(stats.num_failures for stats in timed_stats),
    }


def _compare_pools(worker_counts: tuple[int, ...], warm_up_batch, timed_batches) -> tuple[list[dict], list]:
    """Scores each timed batch on every pool in turn (interleaved), so that load changes hit all alike."""
    pools, startups, warm_ups = [], [], []
    try:
        for num_workers in worker_counts:
            started = time.perf_counter()
            pool = RewardPool(num_workers)
            pools.append(pool)
            pool.wait_ready()
            startups.append(time.perf_counter() - started)
            warm_ups.append(pool.score(*warm_up_batch).stats)
        timed: list[list] = [[] for _ in pools]
        machine_busy: list[list[float]] = [[] for _ in pools]
        for batch in timed_batches:
            for position, pool in enumerate(pools):
                before = _cpu_jiffies()
                started = time.perf_counter()
                timed[position].append(pool.score(*batch))
                machine_busy[position].append(_busy_cores(before, _cpu_jiffies(), time.perf_counter() - started))
    finally:
        for pool in pools:
            pool.close()
    figures = [
        {**_pool_figures(count, startup, warm_up, [stats for _, stats in results]), "machine_busy_cores": busy}
        for count, startup, warm_up, results, busy in zip(worker_counts, startups, warm_ups, timed, machine_busy)
    ]
    rewards = [[reward for rewards, _ in results for reward in rewards.tolist()] for results in timed]
    return figures, rewards


def _in_process(warm_up_batch, timed_batches, domain_batch) -> tuple[dict, list[float]]:
    score_in_process(*warm_up_batch)  # the same warm-up as the pools get
    timed, seconds = [], []
    for batch in timed_batches:
        started = time.perf_counter()
        timed.append(score_in_process(*batch))
        seconds.append(time.perf_counter() - started)
    ms_per_item: dict[str, float] = {}  # on a batch of its own, so that no cache is warm for it
    for domain in sorted(set(domain_batch[2])):
        selected = [index for index, each in enumerate(domain_batch[2]) if each == domain]
        sub_batch = [[column[index] for index in selected] for column in domain_batch]
        started = time.perf_counter()
        score_in_process(*sub_batch)
        ms_per_item[domain] = round(1000 * (time.perf_counter() - started) / len(selected), 2)
    result = {
        "batch_s": [round(each, 3) for each in seconds],
        "best_batch_s": round(min(seconds), 3),
        "items_per_s": round(len(timed_batches[0][0]) / min(seconds), 1),
        "ms_per_item_by_domain": ms_per_item,
        "failures": sum(stats.num_failures for _, stats in timed),
    }
    return result, [reward for rewards, _ in timed for reward in rewards.tolist()]


def main(argv: list[str]) -> None:
    del argv
    size, seed = _BATCH_SIZE.value, _SEED.value
    warm_up_batch = make_batch(size, seed)
    timed_batches = [make_batch(size, seed + 1 + repeat) for repeat in range(_REPEATS.value)]
    domain_batch = make_batch(size, seed + 1000)
    response_chars = [len(response) for batch in timed_batches for response in batch[0]]
    max_workers = _MAX_WORKERS.value or available_cpus()

    load_at_start = os.getloadavg()
    in_process, serial_rewards = _in_process(warm_up_batch, timed_batches, domain_batch)
    (one_worker, all_workers), (one_rewards, all_rewards) = _compare_pools(
        (1, max_workers), warm_up_batch, timed_batches
    )
    assert one_rewards == serial_rewards == all_rewards, "configurations disagree"
    pair_speedups = [one / every for one, every in zip(one_worker["batch_s"], all_workers["batch_s"])]

    results = {
        "benchmark": "reward_throughput",
        "command": "python -m experiments.benchmarks.reward_throughput",
        "batch_size": size,
        "timed_batches": _REPEATS.value,
        "rollouts_per_prompt": 16,
        "domains": {name: timed_batches[0][2].count(name) for name in sorted(set(timed_batches[0][2]))},
        "mean_reward": round(sum(serial_rewards) / len(serial_rewards), 4),
        "response_chars_mean": round(sum(response_chars) / len(response_chars)),
        "response_chars_max": max(response_chars),
        "in_process": in_process,
        "pool_1_worker": one_worker,
        "pool_all_workers": all_workers,
        "speedup_all_vs_1_worker_per_batch": [round(each, 2) for each in pair_speedups],
        "speedup_all_vs_1_worker_best": round(one_worker["best_batch_s"] / all_workers["best_batch_s"], 2),
        "machine": {
            "available_cpus": available_cpus(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    with open(_OUTPUT.value, "w") as file:
        json.dump(results, file, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
