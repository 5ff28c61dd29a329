DROP INDEX model_traces_model_name;
