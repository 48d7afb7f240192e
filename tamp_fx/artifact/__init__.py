"""Artifact: the plan a person can read and diff (``plan``: plan.json + masks), two plans
compared (``compare``) and a plan drawn (``report``)."""
