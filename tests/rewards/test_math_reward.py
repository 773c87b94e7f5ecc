"""math_reward: answer extraction and equivalence on answer pairs (equivalent and not)."""

import threading

import pytest

from nemotron_jax.rewards import extract_math_answer, math_reward

# (response, ground truth, expected reward)
EQUIVALENT = [
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\boxed{\tfrac34}", "3/4"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{3.0}", "3"),
    (r"\boxed{-5}", "-5"),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{\frac{a+b}{2}}", "(a+b)/2"),
    (r"\boxed{2^{10}}", "1024"),
    (r"\boxed{\binom{5}{2}}", "10"),
    (r"\boxed{\log_2 8}", "3"),
    (r"\boxed{0.333333}", r"\frac{1}{3}"),
    (r"\boxed{(1,2]}", "(1,2]"),
    (r"\boxed{(-\infty, 2)}", r"(-\infty,2)"),
    (r"\boxed{x \in [0, 1]}", "[0,1]"),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}"),
    (r"\boxed{1, 2}", r"\{1,2\}"),
    (r"\boxed{x = 2 \text{ or } x = 3}", "2, 3"),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    (r"\boxed{5\text{ cm}}", "5"),
    (r"\boxed{5 cm}", "5"),
    ("The answer is 12 dollars.", "12"),
    (r"\boxed{50\%}", "50"),
    (r"\boxed{50\%}", "0.5"),
    (r"\boxed{30^\circ}", "30"),
    (r"\boxed{\$5}", "5"),
    (r"\boxed{x=3}", "3"),
    (r"We get \boxed{1} at first, but correcting the sign gives \boxed{2}.", "2"),
    (r"So $\boxed 7$.", "7"),
    (r"\fbox{7}", "7"),
    (r"Final answer: $\frac12$.", r"\boxed{0.5}"),
    ("The answer is 42", "42"),
    ("**Final Answer:** 42", "42"),
    (r"<think>Maybe \boxed{3}?</think>The answer is \boxed{4}.", "4"),
    (r"\boxed{0.5}", r"$\frac{1}{2}$"),
    (r"\boxed{42}", 42),
    (r"\boxed{\frac{\frac{1}{2}}{2}}", "0.25"),
    (r"\boxed{\left(\frac{1}{2}, 3\right)}", r"\left(\frac12,3\right)"),
]

NOT_EQUIVALENT = [
    (r"\boxed{\frac{1}{3}}", "0.33"),
    (r"\boxed{0.33}", r"\frac{1}{3}"),
    (r"\boxed{(1,2)}", "[1,2]"),
    (r"\boxed{[1,2)}", "[1,2]"),
    (r"\boxed{\{1,2\}}", r"\{1,3\}"),
    (r"\boxed{x^2}", "x^3"),
    (r"\boxed{2x}", "2y"),
    (r"\boxed{7}", "7.000001"),
    (r"\boxed{10}", "1"),
    (r"\boxed{\sqrt{2}}", "1.41"),
    (r"\boxed{\pi}", "3.14"),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}"),
    (r"\boxed{-2}", "2"),
    (r"\boxed{5\text{ m}}", "6"),
    (r"\boxed{\text{yes}}", r"\text{no}"),
    (r"\boxed{x+1}", "x-1"),
    (r"\boxed{(0, 1)}", "(0, 2)"),
    (r"\boxed{2}", r"\boxed{3}"),
    (r"We get \boxed{1} at first, but correcting the sign gives \boxed{2}.", "1"),
    ("The result is clearly 42", "42"),  # no boxed answer, no "answer is": no answer
    (r"<think>Maybe \boxed{3}?</think>The answer is \boxed{4}.", "3"),  # reasoning does not count
    (r"<think>so it is \boxed{3}", "3"),  # thinking never closed: no answer
    ("", "3"),
    (r"\boxed{}", "3"),
    (r"The answer is \boxed{\frac{1}{2}", "0.5"),  # unclosed box (truncated)
    (r"\boxed{12}", r"\frac{1}{2}"),
]


@pytest.mark.parametrize(("response", "ground_truth"), EQUIVALENT)
def test_equivalent_answers_score_one(response, ground_truth):
    assert math_reward(response, ground_truth) == 1.0


@pytest.mark.parametrize(("response", "ground_truth"), NOT_EQUIVALENT)
def test_wrong_or_missing_answers_score_zero(response, ground_truth):
    assert math_reward(response, ground_truth) == 0.0


def test_at_least_sixty_answer_pairs():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 60


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, \{2\}\}}", r"\{1, \{2\}\}"),
        (r"a \boxed{1} b \boxed{ \sqrt{x_{1}} } c", r"\sqrt{x_{1}}"),
        (r"$\boxed 12$", "12"),
        (r"\fbox{A}", "A"),
        ("The final answer is $x = 5$.", "x = 5"),
        ("Answer: 7 apples", "7"),
        ("nothing stated 7", None),
        (r"<think>\boxed{1}", None),
    ],
)
def test_extract_math_answer(response, answer):
    assert extract_math_answer(response) == answer


def test_bad_ground_truth_raises_naming_it():
    with pytest.raises(ValueError, match="ground_truth"):
        math_reward(r"\boxed{1}", "")


def test_works_off_the_main_thread():
    # math-verify's signal-based timeouts raise in threads; math_reward must switch them off there.
    results = []
    thread = threading.Thread(target=lambda: results.append(math_reward(r"\boxed{\frac{2}{4}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]
