//! understudy-nbd-server (under construction)
