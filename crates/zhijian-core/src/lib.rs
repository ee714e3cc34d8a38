//! Core of zhijian: errors, Backbone and Method traits, hook sites, registry, weight I/O, training engine.
