//! STUB: the store contract suite.
