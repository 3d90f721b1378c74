"""The orchestrator: which adapter the base weights hold (merged / unmerged / mixture), switching, and policies."""
