//! understudy-memsync (under construction)
