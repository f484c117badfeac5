"""``specd bench``: the performance suite — baselines side by side, emulated network delay, a report with plots.

- :mod:`.prompts` the built-in diverse prompt set;
- :mod:`.netem` a delaying TCP proxy on loopback (also stalls and cuts, for fault tests);
- :mod:`.runner` runs the modes, iterations and concurrent sessions;
- :mod:`.figures` turns answers' statistics into the per-mode figures;
- :mod:`.report` JSON and Markdown; :mod:`.plots` the PNG figures; :mod:`.cli` the command.
"""
