"""RL training machinery shared by the agents: losses (Eq 5, Eq 6, joint) and the co-training backbone stage."""
