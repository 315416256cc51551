//! join state-machine tests
