//! understudy-filter (under construction)
