//! understudy-peer (under construction)
