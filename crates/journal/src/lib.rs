//! understudy-journal (under construction)
