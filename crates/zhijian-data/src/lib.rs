//! Data adapters for real data sets: text, splits, tokenisation.
