//! End-to-end tests of the facade.
