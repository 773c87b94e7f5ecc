"""Imported by the scoring pool's fork server before it forks workers: loads the built-in verifiers' heavy state.

Importing this module has side effects on purpose: it imports SymPy and math-verify and loads langdetect's language
profiles and NLTK's Punkt model (a few seconds together), so that every worker forked from the server starts in
milliseconds and shares that memory copy-on-write. Nothing else should import it.
"""

from nemotron_jax.rewards.reward_pool import warm_up_verifiers

warm_up_verifiers()
