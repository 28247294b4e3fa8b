"""Exit policies: anything that decides, layer by layer, whether an instance exits.

- :mod:`~agents.policies.base`: the interface (:class:`ExitPolicy`), static exits, the oracle;
- :mod:`~agents.policies.heuristics`: DeeBERT (entropy), Right-Tool (max probability), PABEE
  (patience), BERxiT (a learned exit head);
- :mod:`~agents.policies.net` and :mod:`~agents.policies.learned`: ConsistentEE's policy network
  and its thresholded inference rule.
"""
from agents.policies.base import ExitPolicy, OracleExit, StaticExit
from agents.policies.heuristics import BerxitExit, EntropyExit, MaxProbExit, PatienceExit
from agents.policies.learned import LearnedExit
from agents.policies.net import LayerMLPPolicy

__all__ = ["ExitPolicy", "StaticExit", "OracleExit", "EntropyExit", "MaxProbExit", "PatienceExit", "BerxitExit",
           "LearnedExit", "LayerMLPPolicy"]
