"""Alignment: rewards and text environments (policy optimisation, reward models and DPO are still to come)."""
