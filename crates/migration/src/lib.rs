//! understudy-migration (under construction)
