//! understudy-nbd-proto (under construction)
