//! State-machine tests with injected time.
