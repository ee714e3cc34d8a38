//! End-to-end tests of the facade (one binary: each test binary links LibTorch).

mod compare;
mod conformance;
