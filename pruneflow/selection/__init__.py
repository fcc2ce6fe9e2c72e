"""Selection and search: from scores to a plan of what every layer keeps.

Owns what a scorer returns (``scores.Scores``), the JSON plan and its selection rules — uniform or global over
groups of heads, channels and blocks, with exact parameter accounting (``plan``) — the forward-only allocation
search that starts from a method's plan (``search``) and iterative pruning's bookkeeping (``iterations``). May
import the model room's architecture data and the execution layer (the search scores candidates through it);
never a method module or the pipeline. This file imports nothing.
"""
