"""``flexos trace``: from learning runs, propose where to cut an app and the least privilege of each compartment.

- :mod:`.units`: what a trace attributes to (third-party packages, the app's modules, a few
  standard-library packages);
- :mod:`.recorder`: the learning run itself, inside the app's interpreter (``python -m flexos.trace``);
- :mod:`.runs`: the records of several runs, merged;
- :mod:`.propose`: which units get a compartment, their mechanism and hardening, each with where it comes from;
- :mod:`.emit`: the proposal as a commented flexos.yaml, and as an explore space;
- :mod:`.cost`: this machine's gate costs (calibrated once, cached) and the predicted slowdown;
- :mod:`.diff`: what a new proposal would change in an existing flexos.yaml;
- :mod:`.session`: one ``flexos trace`` from run to written proposal (the CLI's ``trace`` calls it).

See docs/trace.md.
"""
