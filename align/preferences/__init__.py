"""Preference data: the comparisons format, its sources (OASST, hh-rlhf, ranking sheets), prompts, rankers."""
