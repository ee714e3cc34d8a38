//! Asset manifests and a verifying fetcher for real weights and data sets (no LibTorch dependency).
