"""Comparisons: every method on the same data and budget (recovery mode) and GIFT-SW as PEFT (peft mode)."""
