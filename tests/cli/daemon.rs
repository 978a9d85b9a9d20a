//! Tests for this area (being written).

#[allow(unused_imports)]
use crate::common::*;
