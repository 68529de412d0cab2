//! understudy-qmp (under construction)
