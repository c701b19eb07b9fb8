//! luod
