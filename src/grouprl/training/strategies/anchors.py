"""`offpolicy_anchors`: DaGRPO's expert anchors in hard groups (being built)."""
