//! understudy-bitmap (under construction)
